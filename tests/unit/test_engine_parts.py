"""The replica's engine stage split by vLLM's request stamps (``deployments.stages.engine_parts_ms``)."""

from __future__ import annotations

import pytest

from deployments.stages import ENGINE_PARTS, engine_parts_ms

pytestmark = pytest.mark.unit


def stats(**kw):
    from vllm.v1.metrics.stats import RequestStateStats

    return RequestStateStats(**kw)


def test_the_parts_add_up_to_the_engine_stage():
    # The core queued the request, scheduled it 10 ms later and had its first token 25 ms after that (its own
    # clock); vLLM's front end processed that token 41 ms after the request's arrival; the replica saw it 44 ms
    # after it received the request.
    s = stats(arrival_time=1_000.0, queued_ts=50.004, scheduled_ts=50.014, first_token_ts=50.039,
              first_token_latency=0.041)
    parts = engine_parts_ms(s, engine_s=0.044)
    assert set(parts) == set(ENGINE_PARTS)
    assert parts == pytest.approx({"replica": 3.0, "vllm_frontend": 6.0, "vllm_queue": 10.0, "vllm_prefill": 25.0})
    assert sum(parts.values()) == pytest.approx(44.0)


def test_the_front_end_is_what_vllms_ttft_has_beyond_its_core():
    s = stats(queued_ts=10.0, scheduled_ts=10.002, first_token_ts=10.012, first_token_latency=0.020)
    assert engine_parts_ms(s, engine_s=0.021)["vllm_frontend"] == pytest.approx(8.0)


@pytest.mark.parametrize("s", [None, "not stats", {"queued_ts": 1.0}])
def test_no_stats_no_parts(s):
    assert engine_parts_ms(s, 0.03) == {}


def test_unstamped_or_inconsistent_stamps_give_no_parts():
    assert engine_parts_ms(stats(first_token_latency=0.02), 0.03) == {}  # the core's stamps never came
    assert engine_parts_ms(stats(queued_ts=5.0, scheduled_ts=4.0, first_token_ts=6.0, first_token_latency=0.02),
                           0.03) == {}
    late = engine_parts_ms(stats(queued_ts=1.0, scheduled_ts=1.0, first_token_ts=1.05, first_token_latency=0.04),
                           0.03)  # clocks that disagree by more than the stage: clamped, never negative
    assert min(late.values()) == 0.0
