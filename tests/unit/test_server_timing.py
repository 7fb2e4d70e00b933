"""The ingress's ``Server-Timing`` header (``ingress.server_timing_header``) and the bench's reading of it
(``benchmarks.bench.client.parse_server_timing``)."""

from __future__ import annotations

import time

import httpx
import pytest

from benchmarks.bench.client import parse_server_timing
from deployments.protocol import ReplicaTiming
from deployments.stages import RequestStages
from tests.unit.ingress_stub import StubHandle, stub_ingress

pytestmark = pytest.mark.unit

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


def test_the_header_parses_back_to_the_acceptance_and_the_stages():
    accepted, durations = parse_server_timing(
        'accepted;desc="1765071234.250000", tokenize;dur=0.812, hash;dur=0.031, engine;dur=30.5, ingress;dur=33')
    assert accepted == pytest.approx(1765071234.25)
    assert durations == {"tokenize": 0.812, "hash": 0.031, "engine": 30.5, "ingress": 33.0}
    # other servers' metrics: a name alone, a description alone, a malformed number; none breaks the rest
    assert parse_server_timing('cache, db;dur=x, app;desc="hit";dur=2.5, accepted;desc=soon') == (None, {"app": 2.5})
    assert parse_server_timing("") == (None, {})


def test_the_stages_of_one_request_up_to_its_first_chunk_add_up():
    stages = RequestStages("m", accepted=time.perf_counter())
    before = time.time()
    stages.tokenized = stages.accepted + 0.002
    stages.hashed = stages.tokenized + 0.001
    stages.mark_dispatched()
    wall = stages.dispatched_wall
    stages.on_chunk(ReplicaTiming(received_at=wall + 0.004, first_output_at=wall + 0.034), "r1")
    accepted, durations = parse_server_timing(stages.server_timing())
    assert before - 0.01 <= accepted <= before + 0.001
    assert set(durations) == {"tokenize", "hash", "dispatch", "engine", "return", "ingress"}
    assert durations["tokenize"] == pytest.approx(2.0, abs=1e-3) and durations["engine"] == pytest.approx(30.0)
    assert durations["ingress"] == pytest.approx((stages.first_chunk - stages.accepted) * 1000, abs=1e-3)
    # before any chunk: the acceptance and the stages stamped so far, no total
    early = RequestStages("m", accepted=time.perf_counter())
    assert set(parse_server_timing(early.server_timing())[1]) == set()


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress")


async def test_the_ingress_sends_the_header_only_when_configured(monkeypatch):
    for on in (False, True):
        handle = StubHandle()
        handle.timing = lambda req: ReplicaTiming(received_at=req.dispatched_at + 0.001,
                                                  first_output_at=req.dispatched_at + 0.021)
        app, _, _ = stub_ingress(monkeypatch, {"ingress": {"server_timing_header": on}}, handle)
        before = time.time()
        async with _client(app) as c:
            r = await c.post("/v1/chat/completions", json=CHAT)
            s = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
        after = time.time()
        assert r.status_code == 200 and s.status_code == 200 and "data: [DONE]" in s.text
        for resp in (r, s):
            assert ("server-timing" in resp.headers) is on
            if on:
                accepted, durations = parse_server_timing(resp.headers["server-timing"])
                assert before <= accepted <= after
                assert {"tokenize", "hash", "dispatch", "engine", "return", "ingress"} <= set(durations)
                assert durations["engine"] == pytest.approx(20.0, abs=0.01)
                assert 0 < durations["ingress"] < (after - before) * 1000  # real, unlike the stub's stamps
