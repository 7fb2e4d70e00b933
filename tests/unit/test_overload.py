"""Bounded queues: every shipped config and manifest has them, render refuses unbounded ones, and a request
beyond them gets a fast 503 with Retry-After in OpenAI's shape."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from kuberay_support import copy_inputs

from serve_app.config import ConfigError, DeploymentOptions, load_serve_config
from serve_app.kuberay import render
from serve_app.kuberay.rules_serve import serve_config_rules, unbounded_queues
from tests.unit.ingress_stub import StubHandle, stub_ingress

pytestmark = pytest.mark.unit

ROOT = render.repo_root()
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_bounds_every_queue(path: Path):
    _, apps = load_serve_config(path)
    for app in apps:
        assert unbounded_queues(app) == []
        for dep in [m.deployment for m in app.models] + [app.ingress.deployment]:
            assert dep.serve_options()["backpressure_config"]["retry_after_s"] > 0


def test_every_shipped_manifest_bounds_every_queue():
    for path in sorted((ROOT / "kuberay").glob("rayservice-*.yaml")):
        (rs,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "RayService"]
        errs, apps = serve_config_rules(rs)
        assert errs == [] and apps, path
        for app in yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]:
            deps = [m["deployment"] for m in app["args"]["models"]] + [app["args"]["ingress"]["deployment"]]
            assert all(d["max_queued_requests"] >= 1 for d in deps), path


def test_render_refuses_an_unbounded_queue_before_writing(tmp_path: Path):
    root = copy_inputs(tmp_path)
    cfg = root / "configs" / "cpu.yaml"
    cfg.write_text(cfg.read_text().replace("max_queued_requests: 32", "max_queued_requests: -1"))
    with pytest.raises(ConfigError) as err:
        render.write(root)
    assert str(err.value).startswith("target kvserve-cpu-smoke (configs/cpu.yaml): applications.0.args.models.0."
                                     "deployment.max_queued_requests: -1 (unbounded)")
    assert "set a bound (e.g. 32" in str(err.value)
    assert not list((root / "kuberay").glob("*.yaml"))


def test_validate_reports_an_unbounded_queue_in_a_manifest():
    path = ROOT / "kuberay" / "rayservice-cpu-smoke.yaml"
    (rs,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "RayService"]
    doc = yaml.safe_load(rs["spec"]["serveConfigV2"])
    del doc["applications"][0]["args"]["ingress"]["deployment"]["max_queued_requests"]
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(doc)
    errs, _ = serve_config_rules(rs)
    assert errs == [("spec.serveConfigV2.applications.0.args.ingress.deployment.max_queued_requests: -1 (unbounded): "
                     "under overload requests would wait until ingress.request_timeout_s (180 s) instead of a fast 503 "
                     "with Retry-After; set a bound (e.g. 192, its max_ongoing_requests)")]


def test_queue_options_are_checked_like_serve_checks_them():
    with pytest.raises(ValueError, match="must be -1 \\(unbounded\\) or a positive number"):
        DeploymentOptions(max_ongoing_requests=1, max_queued_requests=0)
    with pytest.raises(ValueError, match="retry_after"):
        DeploymentOptions(max_ongoing_requests=1, backpressure_config={"retry_after": 1})
    with pytest.raises(ValueError, match="status_code"):
        DeploymentOptions(max_ongoing_requests=1, backpressure_config={"status_code": 500})


async def test_a_request_beyond_the_replica_queues_gets_a_fast_503_with_retry_after(monkeypatch):
    from ray.serve.exceptions import BackPressureError

    handle = StubHandle()
    handle.fail = lambda attempt: BackPressureError(num_queued_requests=64, max_queued_requests=64, retry_after_s=2.5)
    app, _, _ = stub_ingress(monkeypatch, handle=handle)
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kvserve") as c:
        r = await c.post("/v1/chat/completions", json=body)
        s = await c.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    assert r.json()["error"] == {"message": "model smollm2 is overloaded; retry later", "type": "overloaded_error",
                                 "param": None, "code": "overloaded"}
    assert len(handle.requests) == 2  # not retried: another attempt would only add load
    # refused before its first token, a stream gets the same status (not a 200 with an error event)
    assert s.status_code == 503 and s.headers["retry-after"] == "3"
    assert s.json()["error"]["code"] == "overloaded"


async def test_beyond_the_ingress_bound_a_503_comes_before_any_work_and_the_count_returns_to_zero(monkeypatch):
    from deployments import admission as admission_mod

    rejected = []
    monkeypatch.setattr(admission_mod, "metrics", lambda: SimpleNamespace(
        admission_rejected_requests=SimpleNamespace(inc=lambda n: rejected.append(n))))
    app, ingress, handle = stub_ingress(monkeypatch)
    adm = ingress.admission
    m = yaml.safe_load((ROOT / "configs/cpu.yaml").read_text())["applications"][0]["args"]["models"][0]["deployment"]
    # the stub reports one running replica of the model and none of the ingress (a share of one)
    assert adm.limit() == m["max_ongoing_requests"] + m["max_queued_requests"]
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kvserve") as c:
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
        assert (await c.post("/v1/chat/completions", json={**body, "stream": True})).status_code == 200
        assert adm.inflight == 0 and ingress.inflight() == 0 and len(handle.requests) == 2
        adm.inflight = adm.limit()  # the models' queues are full
        r = await c.post("/v1/chat/completions", json=body)
        s = await c.post("/v1/completions", json={"model": "smollm2", "prompt": "hi", "stream": True})
        assert (await c.get("/v1/models")).status_code == 200  # only generation requests are bounded
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "overloaded" and r.json()["error"]["type"] == "overloaded_error"
    assert s.status_code == 503 and s.headers["retry-after"] == "1"
    assert len(handle.requests) == 2 and rejected == [1, 1]  # nothing dispatched
    assert adm.inflight == adm.limit()


async def test_a_request_beyond_the_bound_is_refused_unread_unrendered_and_untokenized(monkeypatch):
    """The refusal is decided on arrival: the body is never received, nothing is rendered or tokenized."""
    app, ingress, handle = stub_ingress(monkeypatch)
    adm = ingress.admission
    fe = ingress._models["smollm2"].frontend
    work = []
    for name in ("render_chat", "render_prompts", "prompts"):
        monkeypatch.setattr(fe, name, lambda *a, _n=name, **k: work.append(_n))
    adm.inflight = adm.limit()
    received, sent = [], []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b'{"model": "smollm2", "messages": []}', "more_body": False}

    async def send(message):
        sent.append(message)

    for path in ("/v1/chat/completions", "/v1/completions"):
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
                 "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
                 "headers": [(b"content-type", b"application/json")], "server": ("kvserve", 80),
                 "client": ("127.0.0.1", 1)}
        await app(scope, receive, send)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [503, 503]
    assert all((b"retry-after", b"1") in m["headers"] for m in starts)
    assert received == [] and work == [] and handle.requests == []  # body unread, prompt untouched, nothing sent
    assert adm.inflight == adm.limit()  # a refusal is not counted in flight


def test_the_ingress_bound_follows_running_replicas_and_ingress_share():
    from deployments.admission import Admission, ModelQueue

    running = {"vllm-a": 2, "ingress": 1}
    adm = Admission([ModelQueue("vllm-a", 16, 16, 2), ModelQueue("vllm-b", 8, 4, 1)], running.get, "ingress")
    assert adm.limit() == 2 * 16 + 16 + 1 * 8 + 4  # vllm-b not reported yet: its configured replicas
    running["ingress"] = 3
    assert adm.limit() == 11 + 16 + 3 + 4  # each ingress replica its share of the slots, its own queue
    assert Admission([ModelQueue("vllm-a", 16, -1, 2)], running.get, "ingress").limit() is None


def test_the_ingress_decides_admission_on_the_loop_that_received_the_request():
    """Serve runs the ingress's app on its receiving loop (no hop to a busy user-code thread); a value set in the
    config's own runtime_env wins."""
    from deployments.ingress import build_ingress
    from serve_app.config import load_app_config
    from serve_app.settings import INGRESS_LOOP_ENV

    args = yaml.safe_load((ROOT / "configs/cpu.yaml").read_text())["applications"][0]["args"]
    actor = build_ingress(load_app_config(args), {})._bound_deployment.ray_actor_options
    assert actor["runtime_env"]["env_vars"] == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                                                "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"} == INGRESS_LOOP_ENV
    assert actor["num_cpus"] == args["ingress"]["deployment"]["ray_actor_options"]["num_cpus"]
    args["ingress"]["deployment"]["ray_actor_options"]["runtime_env"] = {
        "env_vars": {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1", "X": "y"}}
    env = build_ingress(load_app_config(args), {})._bound_deployment.ray_actor_options["runtime_env"]["env_vars"]
    assert env == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
                   "X": "y"}


def test_the_first_chat_request_does_not_load_the_processor(monkeypatch):
    """vLLM loads the model's processor from disk to resolve the chat template: at start, not on the event loop of
    the first request (in a burst, every request queued behind it waited)."""
    from vllm.renderers import hf

    monkeypatch.setattr(hf, "_PROCESSOR_CHAT_TEMPLATES", {})  # as in a fresh process
    _, ingress, _ = stub_ingress(monkeypatch)
    loads = []
    real = hf.cached_get_processor
    monkeypatch.setattr(hf, "cached_get_processor", lambda *a, **k: loads.append(a) or real(*a, **k))
    from deployments.openai_api import ChatCompletionRequest

    req = ChatCompletionRequest.model_validate({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]})
    assert ingress._models["smollm2"].frontend.render_chat(req).token_ids
    assert loads == []


async def test_a_model_admits_its_replicas_slots_and_queue_then_answers_503_without_calling_serve(monkeypatch):
    """The model's bound is the ingress's (Serve also counts requests it is still assigning, so its own bound
    refused requests while the replicas had free slots): 1 running replica x 32 slots + 32 queued here."""
    from deployments import admission as admission_mod

    rejected = []
    monkeypatch.setattr(admission_mod, "metrics", lambda: SimpleNamespace(
        admission_rejected_requests=SimpleNamespace(inc=lambda n: rejected.append(n))))
    app, ingress, handle = stub_ingress(monkeypatch)
    adm, dep = ingress.admission, StubHandle.deployment_name
    assert adm.model_limit(dep) == 32 + 32
    body = {"model": "smollm2", "prompt": ["a", "b"], "max_tokens": 2}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kvserve") as c:
        assert (await c.post("/v1/completions", json=body)).status_code == 200
        assert adm.held[dep] == 0 and len(handle.requests) == 2  # each prompt held one place while it ran
        adm.held[dep] = adm.model_limit(dep)  # the replicas' slots and the queue are taken
        r = await c.post("/v1/completions", json={**body, "prompt": "a"})
        s = await c.post("/v1/completions", json={**body, "prompt": "a", "stream": True})
        adm.held[dep] -= 1  # one place frees
        t = await c.post("/v1/completions", json={**body, "prompt": "a"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"] == {"message": "model smollm2 is overloaded; retry later", "type": "overloaded_error",
                                 "param": None, "code": "overloaded"}
    assert s.status_code == 503 and s.json()["error"]["code"] == "overloaded"
    assert t.status_code == 200 and len(handle.requests) == 3  # the refused never reached Serve
    assert adm.held[dep] == adm.model_limit(dep) - 1 and rejected == [1, 1]


def test_serves_own_queue_bound_is_one_the_ingress_cannot_reach_first():
    from deployments.admission import serve_max_queued_requests

    assert serve_max_queued_requests(8, 4, most_replicas=2) == 2 * 8 + 4
    assert serve_max_queued_requests(8, -1, most_replicas=2) == -1
