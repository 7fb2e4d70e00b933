"""Engine arguments and environment of CPU replicas: no torch.compile and no worker process, unless the config
asks for them."""

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


def _replica_env(app) -> dict:
    from deployments.vllm_replica import build_replica

    return build_replica(app.models[0], app)._bound_deployment.ray_actor_options["runtime_env"]["env_vars"]


def test_cpu_replicas_run_the_model_in_the_engine_process_unless_the_config_says_otherwise() -> None:
    from serve_app.settings import CPU_REPLICA_ENV

    assert CPU_REPLICA_ENV.items() <= _replica_env(_app(0)).items()
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in _replica_env(_app(1))
    app = load_app_config({"models": [{
        "id": "m", "path": "m", "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
        "deployment": {"num_replicas": 1, "max_ongoing_requests": 8, "ray_actor_options": {"runtime_env": {
            "env_vars": {"X": "y"}}}},
    }]})
    assert _replica_env(app)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    assert _replica_env(app)["X"] == "y"
