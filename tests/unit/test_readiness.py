"""Readiness from replica states (fake status source) and the counting of rejected requests."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from deployments import rejections
from deployments.openai_api import APIError
from deployments.readiness import Readiness

pytestmark = pytest.mark.unit


@dataclass
class _Dep:  # the shape of ray.serve.schema.DeploymentStatusOverview
    status: str = "UPDATING"
    replica_states: dict = field(default_factory=dict)
    message: str = ""


class _Source:
    def __init__(self) -> None:
        self.deployments: dict = {}
        self.fail = False

    def __call__(self):
        if self.fail:
            raise ConnectionError("controller unreachable")
        return self.deployments


def _readiness(source=None) -> Readiness:
    return Readiness({"a": "vllm-a", "b": "vllm-b"}, source or _Source(), retry_after_s=7)


def test_running_replicas_of_any_deployment_of_the_app() -> None:
    src = _Source()
    r = _readiness(src)
    assert r.running("Ingress") is None
    src.deployments = {"vllm-a": _Dep("HEALTHY", {"RUNNING": 1}),
                       "Ingress": _Dep("UPSCALING", {"RUNNING": 2, "STARTING": 1})}
    assert r.refresh(0.0) and r.running("Ingress") == 2 and r.running("vllm-a") == 1 and r.running("x") is None
    src.fail = True
    assert not r.refresh(1.0) and r.running("Ingress") == 2  # a failed report keeps the last counts


def test_models_start_as_starting_before_any_status() -> None:
    r = _readiness()
    assert r.get("a").state == "starting"
    status, body = r.health()
    assert status == 503 and body == {"status": "starting", "models": {"a": "starting", "b": "starting"}}
    assert r.models_body(lambda i: {"id": i})["data"] == []


def test_a_model_is_ready_only_with_a_running_replica() -> None:
    src = _Source()
    r = _readiness(src)
    src.deployments = {"vllm-a": _Dep("UPDATING", {"STARTING": 2}), "vllm-b": _Dep("UPDATING", {"STARTING": 1})}
    assert r.refresh(now=1.0)
    assert r.get("a").state == "starting" and r.get("a").starting == 2
    src.deployments["vllm-a"] = _Dep("UPDATING", {"RUNNING": 1, "STARTING": 1})
    r.refresh(now=2.0)
    body = r.models_body(lambda i: {"id": i, "object": "model"})
    assert body["data"] == [{"id": "a", "object": "model", "status": "ready"}]
    assert [p["id"] for p in body["pending"]] == ["b"] and body["pending"][0]["status"] == "starting"
    assert r.health()[0] == 503
    src.deployments["vllm-b"] = _Dep("HEALTHY", {"RUNNING": 1})
    r.refresh(now=3.0)
    assert r.health() == (200, {"status": "ok", "models": {"a": "ready", "b": "ready"}})


def test_check_raises_a_503_with_retry_after_in_openai_shape() -> None:
    src = _Source()
    r = _readiness(src)
    src.deployments = {"vllm-a": _Dep("UPDATING", {"STARTING": 2}), "vllm-b": _Dep("HEALTHY", {"RUNNING": 2})}
    r.refresh(now=1.0)
    r.check("b")
    with pytest.raises(APIError) as exc:
        r.check("a")
    err = exc.value
    assert err.status == 503 and err.headers == {"Retry-After": "7"} and err.model == "a"
    assert err.body()["error"]["code"] == "model_not_ready" and "starting" in err.body()["error"]["message"]


def test_failed_deployment_is_unavailable_and_health_says_degraded() -> None:
    src = _Source()
    r = _readiness(src)
    src.deployments = {"vllm-a": _Dep("DEPLOY_FAILED", {}, "engine did not start"),
                       "vllm-b": _Dep("HEALTHY", {"RUNNING": 1})}
    r.refresh(now=1.0)
    assert r.get("a").state == "unavailable"
    assert r.health() == (503, {"status": "degraded", "models": {"a": "unavailable", "b": "ready"}})
    with pytest.raises(APIError, match="engine did not start"):
        r.check("a")


def test_a_deployment_autoscaled_to_zero_takes_requests() -> None:
    src = _Source()
    r = _readiness(src)
    src.deployments = {"vllm-a": _Dep("HEALTHY", {}), "vllm-b": _Dep("UPDATING", {})}
    r.refresh(now=1.0)
    assert r.get("a").state == "scaled_to_zero" and r.get("b").state == "starting"
    r.check("a")  # Serve starts a replica for it
    assert [m["id"] for m in r.models_body(lambda i: {"id": i})["data"]] == ["a"]


def test_a_failed_refresh_keeps_the_last_snapshot() -> None:
    src = _Source()
    r = _readiness(src)
    src.deployments = {"vllm-a": _Dep("HEALTHY", {"RUNNING": 1}), "vllm-b": _Dep("HEALTHY", {"RUNNING": 1})}
    r.refresh(now=1.0)
    src.fail = True
    assert not r.refresh(now=2.0)
    assert r.all_ready()


def test_background_refresh_picks_up_changes() -> None:
    src = _Source()
    r = Readiness({"a": "vllm-a"}, src, refresh_s=0.01)
    r.start()
    try:
        src.deployments = {"vllm-a": _Dep("HEALTHY", {"RUNNING": 1})}
        for _ in range(500):
            if r.all_ready():
                break
            asyncio.run(asyncio.sleep(0.01))
        assert r.all_ready()
    finally:
        r.stop()


class _FakeCounter:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def inc(self, value, tags) -> None:
        self.calls.append({"value": value, **tags})


@pytest.fixture
def counted(monkeypatch) -> _FakeCounter:
    counter = _FakeCounter()
    monkeypatch.setattr(rejections, "metrics", lambda: SimpleNamespace(invocations=counter))
    return counter


def _request(model_ids) -> SimpleNamespace:
    return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(model_ids=frozenset(model_ids))))


def test_unknown_models_share_one_label(counted: _FakeCounter) -> None:
    rejections.record_rejection(404, "made-up-model-123", {"smollm2"})
    rejections.record_rejection(503, "smollm2", {"smollm2"})
    assert counted.calls == [{"value": 1, "model": "unknown", "status": "client_error"},
                             {"value": 1, "model": "smollm2", "status": "server_error"}]


def test_ingress_handlers_count_404_400_and_503_once(counted: _FakeCounter) -> None:
    from fastapi.exceptions import RequestValidationError

    from deployments.http_errors import _api_error, _validation_error

    req = _request({"smollm2"})
    not_found = APIError(404, "no such model", param="model", code="model_not_found")
    resp = asyncio.run(_api_error(req, not_found))
    assert resp.status_code == 404
    not_ready = APIError(503, "starting", headers={"Retry-After": "10"}, model="smollm2")
    resp = asyncio.run(_api_error(req, not_ready))
    assert resp.status_code == 503 and resp.headers["retry-after"] == "10"
    bad = RequestValidationError([{"loc": ("body", "max_tokens"), "msg": "must be >= 1", "type": "x"}],
                                 body={"model": "smollm2", "max_tokens": 0})
    resp = asyncio.run(_validation_error(req, bad))
    assert resp.status_code == 400 and json.loads(resp.body)["error"]["param"] == "max_tokens"
    already = APIError(400, "context too long", model="smollm2")
    already.counted = True  # the request's tracker recorded it
    asyncio.run(_api_error(req, already))
    assert counted.calls == [{"value": 1, "model": "unknown", "status": "client_error"},
                             {"value": 1, "model": "smollm2", "status": "server_error"},
                             {"value": 1, "model": "smollm2", "status": "client_error"}]


def test_polls_slowly_only_while_every_deployment_is_settled_and_every_model_serves() -> None:
    src = _Source()
    r = _readiness(src)
    assert r.interval() == 1.0  # nothing reported yet
    healthy = {"vllm-a": _Dep("HEALTHY", {"RUNNING": 2}), "vllm-b": _Dep("HEALTHY", {"RUNNING": 1}),
               "Ingress": _Dep("HEALTHY", {"RUNNING": 2})}
    src.deployments = dict(healthy)
    assert r.refresh(0.0) and r.interval() == 5.0
    # An autoscaling decision, a replica's failure or a model that cannot serve: fast again.
    for change in ({"vllm-b": _Dep("UPSCALING", {"RUNNING": 1, "STARTING": 1})},
                   {"Ingress": _Dep("UNHEALTHY", {"RUNNING": 1})},
                   {"vllm-a": _Dep("DEPLOY_FAILED", {})}):
        src.deployments = {**healthy, **change}
        assert r.refresh(1.0) and r.interval() == 1.0, change
        src.deployments = dict(healthy)
        assert r.refresh(2.0) and r.interval() == 5.0
    src.deployments = {**healthy, "vllm-a": _Dep("HEALTHY", {})}  # autoscaled to zero: settled at its target
    assert r.refresh(2.5) and r.get("a").state == "scaled_to_zero" and r.interval() == 5.0
    src.fail = True
    assert not r.refresh(3.0) and r.interval() == 1.0  # a failed report: poll again soon
