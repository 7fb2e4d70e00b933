"""Engine arguments of CPU replicas: no torch.compile unless the config asks for it."""

from __future__ import annotations

import pytest

from deployments.engine import CPU_ENGINE_DEFAULTS, engine_args
from serve_app.config import load_app_config

pytestmark = pytest.mark.unit


def _app(num_gpus: float, engine_kwargs: dict | None = None):
    return load_app_config({"models": [{
        "id": "m", "path": "m", "engine_kwargs": engine_kwargs or {},
        "deployment": {"num_replicas": 1, "max_ongoing_requests": 8, "ray_actor_options": {"num_gpus": num_gpus}},
    }]})


def test_cpu_replicas_run_eager_and_gpu_replicas_keep_vllms_default() -> None:
    cpu = _app(0)
    assert engine_args(cpu.models[0], cpu, None)["compilation_config"] == CPU_ENGINE_DEFAULTS["compilation_config"]
    gpu = _app(1)
    assert "compilation_config" not in engine_args(gpu.models[0], gpu, None)


def test_engine_kwargs_override_the_cpu_default() -> None:
    app = _app(0, {"compilation_config": {"mode": 3}})
    assert engine_args(app.models[0], app, None)["compilation_config"] == {"mode": 3}
