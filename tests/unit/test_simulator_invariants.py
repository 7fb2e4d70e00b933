"""The simulator's invariants: requests conserved (failures, autoscaling), capacity respected, tier
hits cost exactly their modelled load (the copy plus the fixed cost of a hit), several ingresses, and the
cost figures."""

from __future__ import annotations

import pytest

from benchmarks.bench.cost import token_costs
from benchmarks.simulator import workloads
from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.load import Driver, LoadPlan, SimSession, Turn
from benchmarks.simulator.replica import Job, ObjectTier, Replica
from benchmarks.simulator.sim import Autoscale, ClusterSpec, simulate
from serve_app.config.routing import RoutingConfig

pytestmark = pytest.mark.unit

ENGINE = EngineModel(prefill_tokens_per_s=20_000, step_s=0.005, decode_s_per_seq=1e-4, kv_blocks=1024,
                     block_size=16, request_overhead_s=0.004, tier_gbps=10.0)


def knobs(strategy: str):
    return RoutingConfig(strategy=strategy, prefill_s_per_token=1 / 20_000).knobs()


def docqa(plan: LoadPlan, docs: int = 16) -> Driver:
    return Driver(workloads.docqa_sessions(docs=docs, doc_tokens=(1024, 2048), output_len=16), plan)


@pytest.mark.parametrize("strategy", ["round-robin", "prefix-aware", "kv-aware", "least-loaded"])
def test_every_request_completes_once_despite_failures(strategy):
    plan = LoadPlan("rate", 60.0, num_requests=400)
    cluster = ClusterSpec(4, ingresses=2, event_lag_s=0.05, failures=((2.0, 1), (4.0, 3)))
    res = simulate(docqa(plan), knobs(strategy), cluster, ENGINE)
    assert res.sent == res.completed == 400
    assert len(res.ttft_s) == len(res.e2e_s) == 400
    assert res.failed_replicas == 2 and res.retries > 0 and res.replicas_end == 2
    late = sum(n for rid, n in res.per_replica.items() if rid in ("r0000", "r0002"))
    assert late > 200  # the survivors took over


def test_autoscaling_adds_replicas_under_load_and_conserves_requests():
    plan = LoadPlan("rate", 80.0, num_requests=600)
    cluster = ClusterSpec(2, autoscale=Autoscale(2, 8, target_ongoing=2.0, period_s=1.0, start_s=2.0))
    res = simulate(docqa(plan), knobs("prefix-aware"), cluster, ENGINE)
    assert res.sent == res.completed == 600
    assert res.scale_ups > 0 and len(res.per_replica) > 2
    assert sum(res.per_replica.values()) == 600


def test_closed_loop_keeps_concurrency_and_multiturn_turns_follow_each_other():
    plan = LoadPlan("concurrency", 8, num_requests=200)
    sessions = workloads.multiturn_sessions(sessions=0, turns=4, output_len=8)
    res = simulate(Driver(sessions, plan), knobs("prefix-aware"), ClusterSpec(2), ENGINE)
    assert res.completed == res.sent == 200
    assert res.cached_tokens > 0  # later turns reuse earlier turns' blocks


def test_a_turns_answer_is_cached_for_the_next_turn_as_vllm_caches_decode_blocks():
    sessions = list(workloads.multiturn_sessions(sessions=8, turns=4, system_words=128, output_len=40))
    first, second = sessions[0].turns[:2]
    assert second.block_hashes[:len(first.block_hashes) + len(first.output_hashes)] == (
        first.block_hashes + first.output_hashes)  # the answer's blocks are the next prompt's
    assert len(first.block_hashes) + len(first.output_hashes) == (first.prompt_tokens + 40 - 1) // 16
    # one replica with room for everything: every block a turn's prompt shares with its session's stream so far hits
    plan = LoadPlan("concurrency", 4, num_requests=32)
    res = simulate(Driver(iter(sessions), plan), knobs("round-robin"), ClusterSpec(1), ENGINE.with_(kv_blocks=4096))
    bound = sum(min((a.prompt_tokens + 39) // 16, b.prompt_tokens // 16) * 16
                for s in sessions for a, b in zip(s.turns, s.turns[1:]))
    assert res.completed == 32 and res.cached_tokens == bound
    # a finished request's answer goes before its prompt, the answer's last block first (vLLM frees a request's tail
    # first), and the cache never holds more than its blocks
    rep = Replica("r0", 0, capacity_blocks=5)
    job = Job(Turn(64, 40, (1, 2, 3, 4), output_hashes=(5, 6)))
    assert rep.admit(job, 8, 16) and rep.held_blocks == 7  # 4 prompt blocks + a tail of ceil(104 / 16) - 4
    rep.insert(job.turn.block_hashes)  # its prefill is done
    assert rep.cache(job.turn.output_hashes) == [5, 6]
    rep.release(job)
    assert rep.evict_unreferenced() == [6] and list(rep.lru) == [5, 4, 3, 2, 1] and rep.pool_blocks == 5


def test_kv_admission_holds_shared_blocks_once_and_releases_them():
    rep = Replica("r0", 0, capacity_blocks=10)
    a, b, c = (Job(Turn(64, 16, (1, 2, 3, 4))), Job(Turn(64, 16, (1, 2, 3, 5))),
               Job(Turn(64, 16, (6, 7, 8, 9))))
    assert rep.admit(a, 10, 16) and rep.held_blocks == 5  # 4 prompt blocks + 1 for the output
    assert rep.admit(b, 10, 16) and rep.held_blocks == 7  # blocks 1-3 shared: 1 new prompt block + 1
    assert not rep.admit(c, 10, 16) and not c.admitted  # 5 more do not fit beside 7
    rep.release(a)
    assert rep.held_blocks == 5 and rep.admit(c, 10, 16) and rep.held_blocks == 10
    for job in (b, c, c):  # a second release changes nothing
        rep.release(job)
    assert rep.held_blocks == 0 and rep.held == {}
    big = Job(Turn(16 * 40, 1, tuple(range(100, 140))))
    assert rep.admit(big, 10, 16)  # alone on the replica it always runs


def test_kv_admission_makes_requests_wait_for_blocks_and_every_one_completes():
    plan = LoadPlan("concurrency", 16, num_requests=120)
    e = ENGINE.with_(kv_blocks=400)  # ~3 docqa prompts of 1-2K tokens at once
    sessions = lambda: workloads.docqa_sessions(docs=64, doc_tokens=(1024, 2048), output_len=16)
    free = simulate(Driver(sessions(), plan), knobs("round-robin"), ClusterSpec(1), e)
    capped = simulate(Driver(sessions(), plan), knobs("round-robin"), ClusterSpec(1), e.with_(kv_admission=True))
    assert capped.completed == capped.sent == free.completed == 120
    ttft = lambda r: sorted(r.ttft_s)[len(r.ttft_s) // 2]
    assert ttft(capped) > 2 * ttft(free)  # the queue for blocks is in TTFT


def test_replica_lru_never_exceeds_capacity_and_evicts_oldest_first():
    rep = Replica("r0", 0, capacity_blocks=4)
    assert rep.insert((1, 2, 3)) == ([1, 2, 3], [])
    stored, evicted = rep.insert((10, 11, 12))
    assert stored == [10, 11, 12] and evicted == [3, 2]  # the prompt head (1) was touched last, kept longest
    assert len(rep.lru) == 4 and rep.gpu_prefix((10, 11, 12, 1)) == 4


def test_tier_respects_its_budget_and_reports_evictions_per_reporter():
    tier = ObjectTier(3)
    tier.put((1, 2), "r0")
    stored, evicted = tier.put((3, 4), "r1")
    assert stored == [3, 4] and evicted == {"r0": [1]}
    assert len(tier.lru) == 3 and tier.prefix((2, 3, 4, 9), 0) == 3 and tier.prefix((7, 2), 1) == 1
    assert tier.drop_reporter("r1") == 2 and list(tier.lru) == [2]


def _one(prompt_blocks: tuple[int, ...], t: float) -> SimSession:
    return SimSession(f"s{t}", [Turn(len(prompt_blocks) * 16 + 8, 4, prompt_blocks)], arrival_s=t)


def test_tier_hit_costs_its_modelled_load_and_beats_recompute():
    blocks = tuple(range(1, 257))  # 4096 tokens + 8
    sessions = [_one(blocks, 0.0), _one(blocks, 5.0)]  # round-robin: r0 computes, r1 loads from the tier
    res = simulate(Driver(iter(sessions), LoadPlan("trace")), knobs("round-robin"),
                   ClusterSpec(2, tier_budget_blocks=10_000), ENGINE)
    cold, hit = res.ttft_s
    e = ENGINE
    tier_tokens = 256 * 16
    load = e.tier_load_s(tier_tokens)
    assert hit == pytest.approx(load + e.step_time_s(0, 0, e.prefill_chunk_s(8, tier_tokens), 0) + e.request_overhead_s)
    assert cold == pytest.approx(e.step_time_s(0, 0, e.prefill_chunk_s(4104, 0), 0) + e.request_overhead_s)
    assert hit - e.request_overhead_s >= load  # never faster than the load itself
    assert hit < cold and res.tier_tokens == tier_tokens and res.cached_tokens == 0


@pytest.mark.parametrize("hit_cost_s", [0.0, 0.045])
@pytest.mark.parametrize("suffix_blocks", [1, 64])
def test_tier_hit_is_never_faster_than_its_modelled_load_plus_the_fixed_cost_of_a_hit(hit_cost_s, suffix_blocks):
    e = ENGINE.with_(tier_hit_s=hit_cost_s)
    a, b = tuple(range(1, 257)), tuple(range(10_001, 10_257))
    suffix = tuple(range(3000, 3000 + suffix_blocks))
    # round-robin alternates r0, r1: r0 computes a prefix, r1 then gets it from the tier, once alone and
    # once (prefix b) while a 9.6K-token prompt of its own is prefilling
    sessions = [_one(a + (1000,), 0.0), _one(a + (2000,), 5.0), _one(b + (1000,), 7.0),
                _one(tuple(range(5000, 5600)), 9.0), _one((7000,), 9.0), _one(b + suffix, 9.0)]
    res = simulate(Driver(iter(sessions), LoadPlan("trace")), knobs("round-robin"),
                   ClusterSpec(2, tier_budget_blocks=10_000), e)
    ttft = res.ttft_s
    tokens = 256 * 16
    ready = e.tier_ready_s(tokens)
    assert ready == pytest.approx(e.tier_load_s(tokens) + hit_cost_s)
    assert ttft[1] == pytest.approx(ready + e.step_time_s(0, 0, e.prefill_chunk_s(24, tokens), 0)
                                    + e.request_overhead_s)
    assert res.tier_tokens == 2 * tokens
    for t in (ttft[1], ttft[5]):
        assert t - e.request_overhead_s >= ready  # never faster than the copy plus the fixed cost of a hit
    assert ttft[5] > ttft[1] or suffix_blocks == 1


def test_without_the_tier_the_second_replica_recomputes():
    blocks = tuple(range(1, 65))
    res = simulate(Driver(iter([_one(blocks, 0.0), _one(blocks, 5.0)]), LoadPlan("trace")), knobs("round-robin"),
                   ClusterSpec(2), ENGINE)
    assert res.ttft_s[0] == pytest.approx(res.ttft_s[1]) and res.tier_tokens == 0


def test_each_ingress_learns_only_from_its_own_decisions():
    def hit(ingresses: int) -> float:
        plan = LoadPlan("rate", 30.0, num_requests=600)
        res = simulate(docqa(plan, docs=32), knobs("prefix-aware"), ClusterSpec(8, ingresses=ingresses), ENGINE)
        return res.predicted_cached_tokens / res.prompt_tokens

    assert hit(4) < hit(1)


def test_a_busy_ingress_delays_first_tokens():
    def ttft_p50(engine: EngineModel) -> float:
        plan = LoadPlan("rate", 40.0, num_requests=300)
        return simulate(docqa(plan), knobs("prefix-aware"), ClusterSpec(4), engine).summary()["ttft_p50_ms"]

    idle = ttft_p50(ENGINE)
    busy = ttft_p50(ENGINE.with_(frontend_s_per_request=0.004, frontend_s_per_token=0.0015))
    assert busy > idle + 4.0  # at least the per-request cost, plus queueing behind streamed tokens


def test_cost_per_1k_tokens():
    c = token_costs(gpus=2, duration_s=1800, input_tokens=1_000_000, output_tokens=250_000, gpu_hour_usd=4.0)
    assert c["cost_usd"] == pytest.approx(4.0)
    assert c["cost_per_1k_input_tokens_usd"] == pytest.approx(0.004)
    assert c["cost_per_1k_output_tokens_usd"] == pytest.approx(0.016)
    assert c["cost_per_1k_tokens_usd"] == pytest.approx(0.0032)
    assert token_costs(gpus=1, duration_s=1, input_tokens=0, output_tokens=0)["cost_per_1k_tokens_usd"] is None
    with pytest.raises(ValueError):
        token_costs(gpus=1, duration_s=1, input_tokens=1, output_tokens=1, gpu_hour_usd=-1)


def test_simulated_cost_charges_the_gpus_held():
    plan = LoadPlan("rate", 20.0, num_requests=100)
    eng = ENGINE.with_(replicas_per_gpu=2)
    s = simulate(docqa(plan), knobs("round-robin"), ClusterSpec(4), eng).summary(gpu_hour_usd=3.6)
    assert s["cost"]["gpus"] == pytest.approx(2.0)
    assert s["cost"]["cost_usd"] == pytest.approx(2 * s["cost"]["duration_s"] / 1000, rel=1e-3)


def test_replica_front_end_is_a_fifo_and_a_request_in_it_survives_its_replica_dying():
    engine = ENGINE.with_(input_s_per_request=0.01)
    reqs = workloads.no_sharing(32, 1.0, prompt_tokens=256, output_tokens=4)
    plan = LoadPlan("concurrency", 32, num_requests=32)
    res = simulate(Driver(iter(workloads.trace_sessions(reqs)), plan), knobs("round-robin"), ClusterSpec(1), engine)
    assert res.completed == 32
    assert max(res.ttft_s) >= 32 * 0.01  # the last of 32 simultaneous arrivals waited for the 31 before it
    res = simulate(Driver(iter(workloads.trace_sessions(reqs)), plan), knobs("round-robin"),
                   ClusterSpec(2, failures=((0.005, 1),)), engine)
    assert res.sent == res.completed == 32 and res.retries > 0
    assert res.per_replica["r0000"] == 32 and res.retries == res.per_replica["r0001"]  # all resent to the survivor


def test_leastconn_sends_a_sessions_next_turn_back_to_the_ingress_that_knows_it():
    """A closed loop whose every worker holds one session: leastconn (Serve's HAProxy) gives a worker's next turn to
    the ingress whose stream just ended, so each prefix-aware ingress predicts more of its prompts than when the
    balancer alternates; the requests and each ingress's count of open streams come out whole, a failure included."""
    from benchmarks.simulator.sim import Cluster

    def run(balance: str) -> tuple[float, Cluster]:
        plan = LoadPlan("concurrency", 16, num_requests=480, width=16)
        driver = Driver(workloads.multiturn_sessions(sessions=0, turns=6, system_words=64, output_len=16), plan)
        cluster = Cluster(driver, knobs("prefix-aware"), ClusterSpec(4, ingresses=2, failures=((1.0, 2),)),
                          ENGINE.with_(ingress_balance=balance), seed=0, measure_from=0)
        res = cluster.run()
        assert res.sent == res.completed == 480 and res.retries > 0
        return res.predicted_cached_tokens / res.prompt_tokens, cluster

    alternating, _ = run("round-robin")
    least, cluster = run("leastconn")
    assert least > alternating + 0.05
    assert [ing.streams for ing in cluster.ings] == [0, 0]
    with pytest.raises(ValueError, match="ingress_balance"):
        ENGINE.with_(ingress_balance="random")
