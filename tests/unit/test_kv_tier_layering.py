"""The KV tier's bookkeeping modules stay pure: no ray, torch or vllm (so they test in ms)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("module", ["deployments.kv_tier", "deployments.kv_tier.keys",
                                    "deployments.kv_tier.directory", "deployments.kv_tier.plan",
                                    "deployments.kv_tier.engine_args"])
def test_pure_module_imports_no_heavy_dependency(module):
    code = f"import sys, {module}; print(sorted(m for m in ('ray', 'torch', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
