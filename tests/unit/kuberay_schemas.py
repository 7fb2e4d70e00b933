"""Where the kuberay tests find the CRD schemas, and what they do without them.

The schemas live beside the checkout (../shared/schemas). A clone elsewhere skips the tests that
need them; CI sets KVSERVE_REQUIRE_SCHEMAS=1 (.ci/run) so that a missing directory fails instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app import settings
from serve_app.kuberay.validate import default_schema_dir


def schema_dir_or_skip() -> Path:
    """The CRD schema directory; skips (or fails, under KVSERVE_REQUIRE_SCHEMAS=1) when it is missing."""
    path = default_schema_dir()
    if path.is_dir():
        return path
    if settings.get("KVSERVE_REQUIRE_SCHEMAS") == "1":
        pytest.fail(f"CRD schemas not found at {path} (KVSERVE_REQUIRE_SCHEMAS=1)")
    pytest.skip(f"CRD schemas not found at {path}")
