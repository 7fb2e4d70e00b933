"""The simulated engine's step loop: asynchronous scheduling (``EngineModel.async_scheduling``) delays a request
that reaches a stepping replica by exactly one step, never one that reaches an idle replica, and changes
neither the steps nor what completes."""

from __future__ import annotations

import pytest

from benchmarks.simulator import workloads
from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.load import Driver, LoadPlan, SimSession, Turn
from benchmarks.simulator.sim import ClusterSpec, simulate, strategy_knobs

pytestmark = pytest.mark.unit

STEP = 0.01
#: Steps of exactly STEP: prefill and decode cost nothing beyond the fixed step.
ENGINE = EngineModel(prefill_tokens_per_s=1e12, step_s=STEP, kv_blocks=1024, block_size=16)


def _trace(arrivals: list[tuple[float, int]]) -> Driver:
    sessions = [SimSession(f"r{i}", [Turn(16, out, (1000 + i,))], arrival_s=t) for i, (t, out) in enumerate(arrivals)]
    return Driver(iter(sessions), LoadPlan("trace"))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_request_reaching_a_stepping_replica_waits_one_more_step_when_asynchronous(async_scheduling):
    # A (t=0) finds the replica idle: its prefill is step 1, [0, 10 ms]; its 50 tokens keep the replica stepping.
    # B comes at 15 ms, during step 2. Synchronous: it joins step 3 (first token at 30 ms). Asynchronous: step 3
    # was formed when step 2 began, so B joins step 4 (40 ms).
    res = simulate(_trace([(0.0, 50), (0.015, 4)]), strategy_knobs("round-robin"), ClusterSpec(1),
                   ENGINE.with_(async_scheduling=async_scheduling))
    ttft_a, ttft_b = res.ttft_s
    assert ttft_a == pytest.approx(STEP)  # an idle replica takes a request at once either way
    assert ttft_b == pytest.approx((2.5 if async_scheduling else 1.5) * STEP)  # from its arrival at 15 ms
    assert res.engine_ttft_s == pytest.approx(res.ttft_s)  # no serving path here: all of it is the engine's
    # split at the start of the step with its first chunk: B waits for step 3 (20 ms) or step 4 (30 ms)
    assert res.engine_wait_s == pytest.approx([0.0, (1.5 if async_scheduling else 0.5) * STEP])
    assert res.engine_prefill_s == pytest.approx([STEP, STEP])
    assert res.completed == 2


def test_an_idle_replica_takes_a_request_at_once_even_after_its_last_request_finished():
    # A's only token comes out of step 1; B arrives during that step and, with nothing else to run, does not
    # wait for a step that was never formed: it is the next one.
    res = simulate(_trace([(0.0, 1), (0.005, 1)]), strategy_knobs("round-robin"), ClusterSpec(1),
                   ENGINE.with_(async_scheduling=True))
    assert sorted(res.ttft_s) == pytest.approx([STEP, 0.015])
    assert res.completed == 2


def test_asynchronous_scheduling_conserves_requests_under_load():
    plan = LoadPlan("concurrency", 16, num_requests=300)
    engine = EngineModel(prefill_tokens_per_s=20_000, step_s=0.005, decode_s_per_ktok=1e-4, kv_blocks=600,
                         kv_admission=True, async_scheduling=True)
    sessions = workloads.docqa_sessions(docs=8, doc_tokens=(512, 1024), output_len=16)
    res = simulate(Driver(sessions, plan), strategy_knobs("kv-aware"), ClusterSpec(2, ingresses=2), engine)
    assert res.sent == res.completed == 300
    assert len(res.ttft_s) == 300 and min(res.ttft_s) > 0


def test_a_step_that_carries_prefill_costs_prefill_step_s_more_and_a_decode_step_does_not():
    engine = ENGINE.with_(prefill_step_s=0.004)
    assert engine.step_time_s(3, 0, 0.0, 0) == pytest.approx(STEP)
    assert engine.step_time_s(3, 0, 0.001, 0) == pytest.approx(STEP + 0.001 + 0.004)
    assert engine.with_(gpu_contention=0.5).step_time_s(0, 0, 0.001, 2) == pytest.approx(2 * (STEP + 0.005))
    # kept apart from the contention (the engine's own time, not the GPU's), the surcharge is not stretched
    apart = engine.with_(gpu_contention=0.5, prefill_step_contends=False)
    assert apart.step_time_s(0, 0, 0.001, 2) == pytest.approx(2 * (STEP + 0.001) + 0.004)
    assert apart.step_time_s(0, 0, 0.0, 2) == pytest.approx(2 * STEP)
    # A alone: its prefill step is 14 ms, then its 3 more tokens come from decode steps of 10 ms each
    res = simulate(_trace([(0.0, 4)]), strategy_knobs("round-robin"), ClusterSpec(1), engine)
    assert res.ttft_s == pytest.approx([0.014]) and res.e2e_s == pytest.approx([0.044])
    with pytest.raises(ValueError, match="prefill_step_s"):
        ENGINE.with_(prefill_step_s=-1.0)


def test_a_step_small_enough_for_a_cuda_graph_pays_no_prefill_surcharge():
    engine = ENGINE.with_(prefill_step_s=0.004, graph_tokens=512)
    # 3 decodes + a 509-token chunk fit the graph; one token more does not
    assert engine.step_time_s(3, 0, 0.001, 0, prefill_tokens=509) == pytest.approx(STEP + 0.001)
    assert engine.step_time_s(3, 0, 0.001, 0, prefill_tokens=510) == pytest.approx(STEP + 0.001 + 0.004)
    assert ENGINE.with_(prefill_step_s=0.004).step_time_s(3, 0, 0.001, 0, prefill_tokens=16) == pytest.approx(
        STEP + 0.001 + 0.004)  # graph_tokens 0: every prefill step pays
    # the simulator counts a step's chunk tokens: A's 16-token prompt is one 10-ms step, B's 1,024 tokens pay 4 ms
    small = simulate(_trace([(0.0, 1)]), strategy_knobs("round-robin"), ClusterSpec(1), engine)
    big = [SimSession("b", [Turn(1024, 1, tuple(range(64)))], arrival_s=0.0)]
    large = simulate(Driver(iter(big), LoadPlan("trace")), strategy_knobs("round-robin"), ClusterSpec(1), engine)
    assert small.ttft_s == pytest.approx([STEP]) and large.ttft_s == pytest.approx([STEP + 0.004])
    with pytest.raises(ValueError, match="graph_tokens"):
        ENGINE.with_(graph_tokens=-1)


def test_a_step_within_the_cuda_graph_pays_its_own_surcharge_for_carrying_prefill():
    engine = ENGINE.with_(prefill_step_s=0.004, graph_tokens=512, graph_step_s=0.0015)
    assert engine.step_time_s(3, 0, 0.001, 0, prefill_tokens=509) == pytest.approx(STEP + 0.001 + 0.0015)
    assert engine.step_time_s(3, 0, 0.001, 0, prefill_tokens=510) == pytest.approx(STEP + 0.001 + 0.004)
    assert engine.step_time_s(3, 0, 0.0, 0) == pytest.approx(STEP)  # a decode step pays neither
    # without graph_tokens every prefill step pays prefill_step_s, graph_step_s unused
    assert ENGINE.with_(prefill_step_s=0.004, graph_step_s=0.0015).step_time_s(
        3, 0, 0.001, 0, prefill_tokens=16) == pytest.approx(STEP + 0.001 + 0.004)
    # contended like the larger step's surcharge: stretched by the busy peers, or added after them when apart
    shared = ENGINE.with_(graph_tokens=512, graph_step_s=0.002, gpu_contention=0.5)
    assert shared.step_time_s(0, 0, 0.001, 2, prefill_tokens=64) == pytest.approx((STEP + 0.001 + 0.002) * 2)
    apart = shared.with_(prefill_step_contends=False)
    assert apart.step_time_s(0, 0, 0.001, 2, prefill_tokens=64) == pytest.approx((STEP + 0.001) * 2 + 0.002)
    with pytest.raises(ValueError, match="graph_step_s"):
        ENGINE.with_(graph_step_s=-0.001)


def test_prefill_chunks_on_one_gpu_share_it_where_decode_steps_do_not():
    # Two replicas on one GPU, one request each at t=0 with a 1,000-token prompt (10 ms of prefill on an idle GPU)
    # and one output token. A step is timed when it starts, against the peers stepping then: the first replica's
    # step starts alone, the second's beside it. Its chunk costs prefill_contention more per peer prefilling;
    # gpu_contention stretches the whole step per peer stepping.
    engine = ENGINE.with_(prefill_tokens_per_s=100_000, replicas_per_gpu=2)
    twin = lambda **kw: sorted(simulate(
        Driver(iter([SimSession(f"r{i}", [Turn(1000, 1, (2000 + i,))]) for i in range(2)]), LoadPlan("trace")),
        strategy_knobs("round-robin"), ClusterSpec(2), engine.with_(**kw)).ttft_s)
    assert twin() == pytest.approx([STEP + 0.01] * 2)
    assert twin(prefill_contention=1.0) == pytest.approx([STEP + 0.01, STEP + 0.02])
    assert twin(gpu_contention=0.5) == pytest.approx([STEP + 0.01, 1.5 * (STEP + 0.01)])
    assert twin(gpu_contention=0.5, prefill_contention=1.0) == pytest.approx([STEP + 0.01, 1.5 * (STEP + 0.01) + 0.01])
    # beside a peer that only decodes, a prompt's chunk pays gpu_contention alone
    beside_decode = lambda **kw: simulate(
        Driver(iter([SimSession("d", [Turn(16, 50, (4000,))]), SimSession("p", [Turn(1000, 1, (4001,))],
                                                                          arrival_s=0.015)]), LoadPlan("trace")),
        strategy_knobs("round-robin"), ClusterSpec(2), engine.with_(**kw)).ttft_s[1]
    assert beside_decode(prefill_contention=1.0) == pytest.approx(beside_decode()) == pytest.approx(STEP + 0.01)


def test_a_peer_only_decoding_counts_for_its_share_of_the_contention():
    engine = ENGINE.with_(gpu_contention=0.5)
    # two busy peers, one of them prefilling: with the default share both count whole
    assert engine.step_time_s(0, 0, 0.001, 2, 1) == pytest.approx(2 * (STEP + 0.001))
    quarter = engine.with_(decoding_peer_share=0.25)
    assert quarter.step_time_s(0, 0, 0.001, 2, 1) == pytest.approx((1 + 0.5 * 1.25) * (STEP + 0.001))
    assert quarter.step_time_s(0, 0, 0.001, 3, 0) == pytest.approx((1 + 0.5 * 0.75) * (STEP + 0.001))
    assert quarter.step_time_s(2, 0, 0.0, 2, 2) == engine.step_time_s(2, 0, 0.0, 2, 2)  # prefilling peers whole
    # in a run: a prompt beside a peer that only decodes is stretched by that share of the contention
    twin = ENGINE.with_(prefill_tokens_per_s=100_000, replicas_per_gpu=2, gpu_contention=0.5)
    ttft = lambda **kw: simulate(
        Driver(iter([SimSession("d", [Turn(16, 50, (4000,))]), SimSession("p", [Turn(1000, 1, (4001,))],
                                                                          arrival_s=0.015)]), LoadPlan("trace")),
        strategy_knobs("round-robin"), ClusterSpec(2), twin.with_(**kw)).ttft_s[1]
    assert ttft() == pytest.approx(1.5 * (STEP + 0.01))
    assert ttft(decoding_peer_share=0.2) == pytest.approx(1.1 * (STEP + 0.01))
    with pytest.raises(ValueError, match="decoding_peer_share"):
        ENGINE.with_(decoding_peer_share=1.5)
