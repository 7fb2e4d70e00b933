"""ingress.request_timeout_s is enforced: a generation past it is stopped (its replica stream closed, so
the engine aborts it) and the client gets a 504 in OpenAI's error shape, in the body or as an SSE event."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployments.generation import Accumulator, sse_events, within
from deployments.openai_api import APIError
from deployments.protocol import GenerateChunk

pytestmark = pytest.mark.unit


def _chunk(text: str) -> GenerateChunk:
    return GenerateChunk(texts={0: text}, finish_reasons={}, token_counts={0: 1}, prompt_tokens=3)


class _Replica:
    """A replica stream: ``fast`` chunks, then one every ``gap_s``; records whether it was closed."""

    def __init__(self, fast: int, gap_s: float, total: int) -> None:
        self.fast, self.gap_s, self.total, self.closed, self.sent = fast, gap_s, total, False, 0

    async def stream(self):
        try:
            for i in range(self.total):
                if i >= self.fast:
                    await asyncio.sleep(self.gap_s)
                self.sent += 1
                yield 0, _chunk(f"t{i}")
        finally:
            self.closed = True


async def test_a_request_within_its_deadline_is_untouched():
    replica = _Replica(fast=3, gap_s=0.0, total=3)
    got = [c async for _, c in within(replica.stream(), 5)]
    assert [c.texts[0] for c in got] == ["t0", "t1", "t2"]
    assert replica.closed


async def test_a_request_past_its_deadline_is_stopped_with_a_504():
    replica = _Replica(fast=2, gap_s=10.0, total=5)
    got = []
    with pytest.raises(APIError) as err:
        async for _, c in within(replica.stream(), 0.2):
            got.append(c)
    assert len(got) == 2 and replica.sent == 2
    assert replica.closed  # the replica call is closed, which aborts the engine request
    assert err.value.status == 504 and err.value.body()["error"]["code"] == "request_timeout"


async def test_a_streaming_request_past_its_deadline_ends_with_an_error_event():
    replica = _Replica(fast=1, gap_s=10.0, total=3)
    acc = Accumulator(chat=False, rid="cmpl-x", created=0, model="m")
    errors = []
    events = [e async for e in sse_events(acc, within(replica.stream(), 0.2), 1, False, None, errors.append)]
    assert events[-1] == "data: [DONE]\n\n"
    body = json.loads(events[-2].removeprefix("data: "))
    assert body["error"]["type"] == "timeout_error" and "request_timeout_s=0.2" in body["error"]["message"]
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["text"] == "t0"
    assert [e.status for e in errors] == [504] and replica.closed
