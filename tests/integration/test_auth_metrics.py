"""The gate's refusal counters reach Prometheus text on a real Ray: a ``deployments.auth.Gate`` in a Ray actor
(its default reporter, as in the ingress) refuses requests and the node's metrics port shows them by reason and
tenant, with unknown keys under ``tenant="unknown"``. No app or engine needed."""

from __future__ import annotations

import re
import time

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_auth_refusals_appear_in_prometheus_text(ray_cluster):
    import ray

    from deployments.auth import Gate, load_keys
    from serve_app.config import AuthConfig

    cfg = AuthConfig.model_validate({"enabled": True, "tenants": {"acme": {"requests_per_min": 1}}})
    gate = ray.remote(Gate).options(num_cpus=0).remote(cfg, load_keys(cfg, {"KVSERVE_API_KEYS": "acme:sk-acme"}))
    refused = 0
    for header in (None, "Bearer sk-guess-1", "Bearer sk-guess-2", "Bearer sk-acme", "Bearer sk-acme"):
        try:
            ray.get(gate.authenticate.remote(header, 0.0))
        except ray.exceptions.RayError:  # the APIError of a refusal (Ray may not rebuild it here)
            refused += 1
    assert refused == 4
    want = {("ray_kvserve_auth_rejected_requests_total", "missing_key", "unknown"): 1,
            ("ray_kvserve_auth_rejected_requests_total", "invalid_key", "unknown"): 2,
            ("ray_kvserve_rate_limited_requests_total", "requests_per_min", "acme"): 1}
    deadline, got = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics", timeout=10).text
        got = {k: _value(text, k[0], reason=k[1], tenant=k[2]) for k in want}
        if all(v is not None and v >= want[k] for k, v in got.items()):
            break
        time.sleep(1)
    ray.kill(gate)
    assert got == want
    assert not re.search(r'tenant="sk-', text), "a key never becomes a label"
