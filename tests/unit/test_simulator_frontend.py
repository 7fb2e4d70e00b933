"""The ingress CPU's disciplines (``benchmarks/simulator/frontend.py``): processor sharing conserves work,
a lone job is delayed by its cost alone, equal jobs finish together, and in the simulator a PS ingress
delays first tokens and caps a closed loop's throughput; FIFO stays available; the ingress's work per
request depends on the prompt's kind (text is tokenised, token ids are not) and on whether the strategy
hashes."""

from __future__ import annotations

import random

import pytest

from benchmarks.simulator import workloads
from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.frontend import FifoServer, LoopServer, PSServer, QueueServer
from benchmarks.simulator.load import Driver, LoadPlan
from benchmarks.simulator.sim import ClusterSpec, simulate
from serve_app.config.routing import RoutingConfig

pytestmark = pytest.mark.unit

ENGINE = EngineModel(prefill_tokens_per_s=20_000, step_s=0.005, kv_blocks=1024, block_size=16)


def drain(server: PSServer) -> list[tuple[float, object]]:
    """Run ``server`` until idle; returns (time, mark) in the order reached."""
    out = []
    while (t := server.next_time()) is not None:
        out += [(t, m) for m in server.due(t)]
    return out


def test_a_lone_job_is_delayed_by_its_cost():
    s = PSServer()
    s.add(2.0, "a", 0.011, "routed")
    s.add(2.0, "a", 0.0002, "first")
    assert drain(s) == [(pytest.approx(2.011), "routed"), (pytest.approx(2.0112), "first")]
    assert s.active == 0


def test_equal_jobs_started_together_finish_together():
    s = PSServer()
    for j in range(5):
        s.add(1.0, j, 0.01, j)
    done = drain(s)
    assert sorted(m for _, m in done) == list(range(5))
    assert {round(t, 9) for t, _ in done} == {1.05}


def test_a_short_job_overtakes_a_long_one():
    s = PSServer()
    s.add(0.0, "long", 0.02, "long")
    s.add(0.01, "short", 0.005, "short")  # long has 0.01 left; both at half speed
    assert drain(s) == [(pytest.approx(0.02), "short"), (pytest.approx(0.025), "long")]


def test_work_is_conserved():
    rng, s = random.Random(7), PSServer()
    arrivals = sorted((rng.uniform(0, 1.0), j, rng.uniform(0.001, 0.05)) for j in range(200))
    reached = []
    for at, j, w in arrivals:
        while (nxt := s.next_time()) is not None and nxt <= at:
            reached += s.due(nxt)
        s.add(at, j % 17, w, j)
    reached += [m for _, m in drain(s)]
    assert sorted(reached) == list(range(200))
    assert s.busy_s == pytest.approx(s.work_added_s) == pytest.approx(sum(w for _, _, w in arrivals))


def test_fifo_server_queues_in_arrival_order():
    f = FifoServer()
    assert f.work(1.0, 0.01) == pytest.approx(1.01)
    assert f.work(1.0, 0.01) == pytest.approx(1.02)
    assert f.work(5.0, 0.01) == pytest.approx(5.01)


def test_a_queue_server_runs_callbacks_started_together_one_after_another():
    s = QueueServer()
    for j in range(4):
        s.add(1.0, j, 0.01, j)  # four sends started at once (a bench process's workers)
    s.add(1.0, 0, 0.002)  # an unmarked callback (a token read) delays what is queued after it
    s.add(1.0, 9, 0.001, "after")
    done = drain(s)
    assert [m for _, m in done] == [0, 1, 2, 3, "after"]
    assert [round(t, 9) for t, _ in done] == [1.01, 1.02, 1.03, 1.04, 1.043]
    s.add(5.0, 1, 0.01, "idle")  # a core idle meanwhile starts at once
    assert drain(s) == [(pytest.approx(5.01), "idle")]
    assert s.work_added_s == pytest.approx(0.053)


def test_the_sharing_is_validated():
    with pytest.raises(ValueError):
        EngineModel(frontend_sharing="lifo")
    with pytest.raises(ValueError, match="client_sharing"):
        EngineModel(client_sharing="loop")


def _closed(engine: EngineModel) -> dict:
    plan = LoadPlan("concurrency", 32, duration_s=6.0)
    sessions = workloads.multiturn_sessions(sessions=64, turns=4, system_words=256, output_len=32, block_size=16)
    return simulate(Driver(sessions, plan), RoutingConfig(strategy="round-robin").knobs(), ClusterSpec(2),
                    engine).summary(per_replica=False)


def test_a_ps_ingress_delays_first_tokens_and_caps_a_closed_loop():
    free = _closed(ENGINE)
    costly = ENGINE.with_(frontend_s_per_request=0.002, frontend_s_per_token=0.0002)
    ps, fifo = _closed(costly), _closed(costly.with_(frontend_sharing="fifo"))
    assert ps["ttft_p50_ms"] > free["ttft_p50_ms"] + 2.0  # at least the per-request cost
    # one core: 2 ms per request + 0.2 ms per token bound the rate; the client sees it (the loop waits)
    requests_per_s = ps["output_tok_per_s"] / 32
    assert requests_per_s * 0.002 + ps["output_tok_per_s"] * 0.0002 <= 1.02
    assert ps["output_tok_per_s"] < free["output_tok_per_s"]
    assert fifo["requests"] > 0 and fifo["ttft_p50_ms"] != ps["ttft_p50_ms"]


def _lone_ttft(engine: EngineModel, strategy: str, *, text: bool, prompt: int = 2048) -> float:
    """TTFT of one request alone, sent as text or as token ids, routed by ``strategy``."""
    hashes = workloads.chain_keys([(1, b) for b in range(prompt // engine.block_size)])
    session = workloads.SimSession("s", [workloads.Turn(prompt, 2, hashes, text=text)])
    res = simulate(Driver(iter([session]), LoadPlan("concurrency", 1, num_requests=1)),
                   RoutingConfig(strategy=strategy).knobs(), ClusterSpec(2), engine)
    return res.ttft_s[0]


def test_ingress_work_depends_on_the_prompt_kind_and_the_strategy():
    engine = ENGINE.with_(frontend_s_per_request=0.001, frontend_tokenize_s=0.006, frontend_hash_s_per_ktok=0.0005)
    bare = _lone_ttft(ENGINE, "round-robin", text=False)
    # token ids are not tokenised, and round-robin does not hash: only the fixed part
    assert _lone_ttft(engine, "round-robin", text=False) == pytest.approx(bare + 0.001)
    # a text prompt is tokenised
    assert _lone_ttft(engine, "round-robin", text=True) == pytest.approx(bare + 0.007)
    # kv-aware also hashes the prompt's blocks: 2,048 tokens at 0.5 ms per 1K
    assert _lone_ttft(engine, "kv-aware", text=False) == pytest.approx(_lone_ttft(ENGINE, "kv-aware", text=False)
                                                                        + 0.001 + 0.001024)
    assert engine.prepare_s(2048, text=True, hashed=True) == pytest.approx(0.001 + 0.006 + 0.001024)
    with pytest.raises(ValueError):
        EngineModel(frontend_hash_s_per_ktok=-1.0)


def test_multiturn_turns_are_text_and_docqa_turns_token_ids():
    turn = next(workloads.multiturn_sessions(sessions=1, turns=1)).turns[0]
    assert turn.text
    assert not next(workloads.docqa_sessions()).turns[0].text


def test_a_replica_busy_streaming_delays_the_next_requests_input():
    free = _closed(ENGINE)
    streaming = _closed(ENGINE.with_(replica_s_per_token=0.0005))
    # 32 requests decoding on two replicas: up to 16 tokens a step each, up to 8 ms of streaming per ~5-ms step
    assert streaming["ttft_p50_ms"] > free["ttft_p50_ms"] + 2.0
    assert streaming["requests"] > 0
    assert _lone_ttft(ENGINE.with_(replica_s_per_token=0.0005), "round-robin", text=False) == pytest.approx(
        _lone_ttft(ENGINE, "round-robin", text=False))  # alone, nothing streams before it
    with pytest.raises(ValueError, match="replica_s_per_token"):
        EngineModel(replica_s_per_token=-1.0)


def test_the_loop_serves_callbacks_in_order_and_reports_its_busy_share():
    loop = LoopServer(window_s=1.0)
    assert loop.work(10.0, 0.2) == pytest.approx(10.2)
    assert loop.work(10.1, 0.1) == pytest.approx(10.3)  # behind the first
    assert loop.work(10.8, 0.1) == pytest.approx(10.9)
    assert loop.busy_share(10.3) == pytest.approx(0.3)
    assert loop.busy_share(10.85) == pytest.approx(0.35)  # work queued past now not counted
    assert loop.busy_share(11.25) == pytest.approx(0.15)  # [10.25, 11.25]: 0.05 of the first span + 0.1
    assert loop.busy_share(13.0) == 0.0 and not loop.spans
    assert loop.work_added_s == pytest.approx(0.4)


def test_a_lone_request_through_the_loop_costs_its_work_once():
    loop = ENGINE.with_(frontend_sharing="loop", frontend_hops=3, frontend_s_per_request=0.003,
                        frontend_s_per_token=0.0002)
    bare = _lone_ttft(ENGINE, "round-robin", text=False)
    # three hops of 1 ms each with nothing between them, then the first chunk's callback
    assert _lone_ttft(loop, "round-robin", text=False) == pytest.approx(bare + 0.003 + 0.0002)
    with pytest.raises(ValueError, match="frontend_hops"):
        EngineModel(frontend_hops=0)
    with pytest.raises(ValueError, match="frontend_merge_busy"):
        EngineModel(frontend_merge_busy=1.5)


def test_hops_wait_behind_chunk_bursts_and_merging_relieves_the_loop():
    base = ENGINE.with_(frontend_sharing="loop", frontend_s_per_request=0.002, frontend_s_per_token=0.0003)
    one, three = _closed(base), _closed(base.with_(frontend_hops=3))
    # the same work, but a request split into hops queues behind each step's burst of chunks more often
    assert three["ttft_p50_ms"] > one["ttft_p50_ms"]
    merged = _closed(base.with_(frontend_hops=3, frontend_merge_busy=0.3, frontend_merge_interval_s=0.02))
    assert merged["ttft_p50_ms"] < three["ttft_p50_ms"]
    assert merged["output_tok_per_s"] >= three["output_tok_per_s"]
    for r in (one, three, merged):
        assert r["requests"] > 0


def test_every_request_completes_once_through_the_loop():
    engine = ENGINE.with_(frontend_sharing="loop", frontend_hops=3, frontend_s_per_request=0.001,
                          frontend_s_per_token=0.0001, frontend_merge_busy=0.2, client_s_per_token=0.00005)
    sessions = workloads.multiturn_sessions(sessions=16, turns=3, system_words=128, output_len=16, block_size=16)
    res = simulate(Driver(sessions, LoadPlan("concurrency", 8, num_requests=48)),
                   RoutingConfig(strategy="kv-aware").knobs(), ClusterSpec(2, ingresses=2), engine)
    assert res.completed == res.sent == 48
    assert len(res.ttft_s) == 48 and all(t > 0 for t in res.ttft_s)


def test_a_hold_serves_no_job_and_holds_queue_one_after_another():
    s = PSServer()
    s.add(0.0, "a", 1.0, "done")
    assert s.hold(0.2, 0.5) == pytest.approx(0.7)
    assert s.hold(0.3, 0.25) == pytest.approx(0.95)  # behind the first hold, not beside it
    assert drain(s) == [(pytest.approx(1.75), "done")]  # 1 s of work + 0.75 s held
    s.add(5.0, "b", 0.1, "b")
    assert s.hold(5.0, 0.0) == 5.0 and drain(s) == [(pytest.approx(5.1), "b")]  # an empty hold changes nothing


def test_a_hold_before_any_job_delays_the_jobs_added_during_it():
    s = PSServer()
    s.hold(1.0, 0.2)
    s.add(1.1, "a", 0.1, "a")
    s.add(1.1, "b", 0.1, "b")
    assert [t for t, _ in drain(s)] == [pytest.approx(1.4), pytest.approx(1.4)]  # from 1.2, shared by two


def test_a_loop_hold_waits_its_turn_but_is_not_busy_time():
    loop = LoopServer(window_s=1.0)
    loop.work(0.0, 0.1)
    assert loop.hold(0.0, 0.3) == pytest.approx(0.4)
    assert loop.work(0.05, 0.1) == pytest.approx(0.5)  # behind the hold
    assert loop.busy_share(1.0) == pytest.approx(0.2)  # the held 0.3 s was off the CPU


@pytest.mark.parametrize("sharing", ["ps", "loop", "fifo"])
def test_ray_tree_calls_hold_its_ingress_and_only_the_twins(sharing):
    from benchmarks.simulator.ray_twin import RAY_TWIN
    from benchmarks.simulator.sim import strategy_knobs

    engine = ENGINE.with_(frontend_s_per_request=0.002, frontend_s_per_token=1e-4, frontend_sharing=sharing)
    held = engine.with_(tree_call_s=0.004, tree_call_s_per_ktok=0.002)
    assert held.tree_call_hold_s(500) == pytest.approx(0.005)

    def run(strategy, eng):
        sessions = workloads.docqa_sessions(docs=4, doc_tokens=(512, 1024), output_len=8)
        plan = LoadPlan("concurrency", 8, num_requests=200)
        return simulate(Driver(sessions, plan), strategy_knobs(strategy), ClusterSpec(2, ingresses=1), eng)

    base, slow = run(RAY_TWIN, engine), run(RAY_TWIN, held)
    assert base.completed == slow.completed == 200
    assert slow.summary()["ttft_p50_ms"] > base.summary()["ttft_p50_ms"] + 4  # at least its own match
    simulated = [{k: v for k, v in run("kv-aware", e).summary().items() if "_us" not in k} for e in (engine, held)]
    assert simulated[0] == simulated[1]  # kvserve's routers make no such call (the _us keys are this host's clock)


@pytest.mark.parametrize("sharing", ["ps", "loop"])
def test_a_chat_prompts_inline_tokenising_holds_its_ingress_and_a_token_id_prompt_behind_it(sharing):
    # One ingress; tokenising a chat prompt holds its loop 20 ms. Alone, a chat prompt's TTFT grows by exactly that
    # and a token-id prompt's not at all; a token-id prompt arriving 3 ms after a chat prompt (whose 2 ms of work are
    # done by then, so the hold has begun) waits behind the hold.
    engine = ENGINE.with_(frontend_s_per_request=0.002, frontend_sharing=sharing)
    held = engine.with_(tokenize_hold_s=0.02)

    def ttfts(eng, chat: list[bool]) -> list[float]:
        sessions = [workloads.SimSession(f"s{i}", [workloads.Turn(
            256, 2, workloads.chain_keys([(i, b) for b in range(16)]), text=text)], arrival_s=0.003 * i)
            for i, text in enumerate(chat)]
        return sorted(simulate(Driver(iter(sessions), LoadPlan("trace")), RoutingConfig(strategy="round-robin").knobs(),
                               ClusterSpec(2, ingresses=1), eng).ttft_s)

    assert ttfts(held, [True]) == pytest.approx([ttfts(engine, [True])[0] + 0.02])
    assert ttfts(held, [False]) == pytest.approx(ttfts(engine, [False]))
    assert min(ttfts(held, [True, False])) > max(ttfts(engine, [True, False])) + 0.015
    with pytest.raises(ValueError, match="tokenize_hold_s"):
        EngineModel(tokenize_hold_s=-1.0)
