"""Shared by the kuberay tests: the CRD schemas and a scratch copy of the render inputs.

The schemas ship in the repository (kuberay/schemas, verbatim upstream files; sources and licences in
its README.md). A checkout without them (a sparse one) skips the tests that need them; CI sets
KVSERVE_REQUIRE_SCHEMAS=1 (.ci/run) so that a missing directory fails instead.
``copy_inputs`` copies what `kvserve kuberay render` reads (configs/ and kuberay/Dockerfile), so a test
can change a source and render without touching the repository.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serve_app import settings
from serve_app.kuberay.render import repo_root
from serve_app.kuberay.validate import default_schema_dir


def schema_dir_or_skip() -> Path:
    """The CRD schema directory; skips (or fails, under KVSERVE_REQUIRE_SCHEMAS=1) when it is missing."""
    path = default_schema_dir()
    if path.is_dir():
        return path
    if settings.get("KVSERVE_REQUIRE_SCHEMAS") == "1":
        pytest.fail(f"CRD schemas not found at {path} (KVSERVE_REQUIRE_SCHEMAS=1)")
    pytest.skip(f"CRD schemas not found at {path}")


def copy_inputs(dest: Path) -> Path:
    """Copy the render inputs (configs/ and kuberay/Dockerfile) under ``dest``; return ``dest``."""
    root = repo_root()
    shutil.copytree(root / "configs", dest / "configs")
    (dest / "kuberay").mkdir()
    shutil.copy(root / "kuberay" / "Dockerfile", dest / "kuberay" / "Dockerfile")
    return dest
