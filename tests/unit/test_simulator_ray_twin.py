"""The simulator's twin of Ray's PrefixCacheAffinityRouter (``benchmarks/simulator/ray_twin.py``): new prompts
go to the smallest tenant, known ones to the longest match, the shortest queue within the group, and one tree
for every ingress."""

from __future__ import annotations

import random

import pytest

from benchmarks.simulator import workloads
from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.load import Driver, LoadPlan
from benchmarks.simulator.ray_twin import RAY_TWIN, RayPrefixAffinity, RayTree
from benchmarks.simulator.routing_cells import gpu_cells
from benchmarks.simulator.sim import ClusterSpec, simulate, strategy_knobs
from routers.types import ReplicaSnapshot, RoutingRequest

pytestmark = pytest.mark.unit

BS = 16


def snaps(running: dict[str, int]) -> list[ReplicaSnapshot]:
    return [ReplicaSnapshot(rid, running=n, block_size=BS, max_ongoing=8, has_stats=True)
            for rid, n in running.items()]


def req(hashes: tuple[int, ...], tail: int = 8) -> RoutingRequest:
    return RoutingRequest("m", len(hashes) * BS + tail, hashes)


def route(policy, request, snapshots, rng, taken: bool = True) -> str:
    """Decide and route; ``taken``: Serve has the replica's reply (its prompt is in the tree, its count in the
    queue-length cache, here the snapshot's running count and this request) before the next decision."""
    d = policy.choose(request, snapshots, 0.0, rng)
    snap = next(s for s in snapshots if s.replica_id == d.replica_id)
    policy.on_routed(request, snap, 0.0)
    if taken:
        policy.accepted(request, d.replica_id, BS, snap.running + 1)
    return d.replica_id


def test_new_prompts_go_to_the_smallest_tenant_and_known_ones_to_the_longest_match():
    rng = random.Random(0)
    p = RayPrefixAffinity(strategy_knobs(RAY_TWIN), RayTree())
    s = snaps({"a": 0, "b": 0, "c": 0})
    doc1, doc2, doc3 = tuple(range(1, 11)), tuple(range(11, 31)), tuple(range(31, 36))
    first = route(p, req(doc1), s, rng)
    second = route(p, req(doc2), s, rng)
    assert second != first  # the first tenant is no longer the smallest
    third = route(p, req(doc3), s, rng)
    assert third not in (first, second)
    assert p.tree.tokens[second] == 20 * BS + 8  # its blocks and its partial tail
    # the same document with another question: the holder, even with the longest queue
    busy = snaps({first: 5, second: 0, third: 0})
    d = p.choose(req(doc1 + (99,)), busy, 0.0, rng)
    assert d.replica_id == first and d.reason == "cache-hit" and d.predicted_cached_tokens == 10 * BS


def test_a_match_below_a_tenth_of_the_prompt_counts_as_new():
    rng = random.Random(0)
    p = RayPrefixAffinity(strategy_knobs(RAY_TWIN), RayTree())
    s = snaps({"a": 0, "b": 0})
    holder = route(p, req((1,), tail=0), s, rng)
    route(p, req(tuple(range(100, 140))), s, rng)  # the other replica becomes the bigger tenant
    d = p.choose(req((1,) + tuple(range(200, 219))), s, 0.0, rng)  # shares 1 block of 20: 5%
    assert d.reason == "no-cache" and d.replica_id == holder  # the smallest tenant, which happens to hold it


def test_new_prompts_decided_before_the_first_is_taken_all_go_to_the_same_smallest_tenant():
    rng = random.Random(0)
    p = RayPrefixAffinity(strategy_knobs(RAY_TWIN), RayTree())
    p.tree.add("a")
    p.accepted(req((500,), tail=0), "a", BS, 0)  # a holds something: b and c are the smallest tenants
    wave = [route(p, req(tuple(range(100 * i, 100 * i + 40))), snaps({"a": 0, "b": 6, "c": 0}), rng, taken=False)
            for i in range(1, 6)]
    assert wave == ["c"] * 5  # of b and c, c has the shorter queue (5 sends), and no insert has landed: all five there
    for i in range(1, 6):
        p.accepted(req(tuple(range(100 * i, 100 * i + 40))), "c", BS, 5)
    assert route(p, req(tuple(range(900, 940))), snaps({"a": 0, "b": 2, "c": 0}), rng) == "b"  # now b is smallest
    later = p.choose(req(tuple(range(300, 340)) + (7,)), snaps({"a": 0, "b": 0, "c": 9}), 0.0, rng)
    assert later.replica_id == "c" and later.reason == "cache-hit"  # its session's next turn stays on the wave's


def test_a_prompt_taken_by_a_replica_removed_meanwhile_is_not_inserted():
    p = RayPrefixAffinity(strategy_knobs(RAY_TWIN), RayTree())
    p.tree.add("a")
    p.remove_replica("a")
    p.accepted(req((1, 2)), "a", BS, 1)
    assert "a" not in p.tree.tokens and "a" not in p.queue


def test_within_the_group_the_shortest_queue_wins():
    rng = random.Random(0)
    p = RayPrefixAffinity(strategy_knobs(RAY_TWIN), RayTree())
    doc = tuple(range(1, 11))
    for rid, ongoing in (("a", 3), ("b", 1)):  # both hold the document; their replies told their counts
        p.tree.add(rid)
        p.accepted(req(doc), rid, BS, ongoing)
    d = p.choose(req(doc + (7,)), snaps({"a": 3, "b": 1, "c": 0}), 0.0, rng)
    assert d.replica_id == "b"  # c is idle but holds nothing; of the holders b has the shorter queue


def test_the_queue_lengths_are_serves_cache_counted_at_send_set_by_reply_and_done():
    """Serve's queue-length cache of one ingress: +1 per send, the replica's own count in its reply (every ingress's
    requests), -1 per completion; a replica without an entry counts the snapshot's; the first of equal queues wins."""
    rng = random.Random(0)
    p = RayPrefixAffinity(strategy_knobs(RAY_TWIN), RayTree())
    idle = snaps({"a": 0, "b": 0, "c": 0})
    for rid in ("a", "b", "c"):  # equal tenants: every new prompt's group is all three
        p.tree.add(rid)
    sent = [p.choose(req((10 + i,), tail=0), idle, 0.0, rng).replica_id for i in range(4)]
    assert sent == ["a", "b", "c", "a"]  # the first lowest, and each send counted before the next decision
    assert p.queue == {"a": 2, "b": 1, "c": 1}
    p.accepted(req((10,), tail=0), "b", BS, 6)  # b's reply: it holds 6 (the other ingress's too)
    p.completed("a")
    p.completed("a")
    assert p.queue == {"a": 0, "b": 6, "c": 1}
    p.tree.tokens = {"a": 0, "b": 0, "c": 0}  # equal tenants again
    assert p.choose(req((20,), tail=0), snaps({"a": 9, "b": 0, "c": 0}), 0.0, rng).replica_id == "a"  # its cache: 0
    p.completed("zz")  # a replica this ingress never sent to: nothing
    assert "zz" not in p.queue


def test_engine_refuses_a_negative_ray_reply():
    with pytest.raises(ValueError, match="ray_reply_s"):
        EngineModel(ray_reply_s=-0.001)


def test_every_ingress_shares_one_tree_and_docqa_spreads_evenly():
    engine = EngineModel(prefill_tokens_per_s=50_000, step_s=0.005, decode_s_per_ktok=1e-5, kv_blocks=2048)
    plan = LoadPlan("concurrency", 32, num_requests=800)
    sessions = workloads.docqa_sessions(docs=16, doc_tokens=(1024, 2048), output_len=16)
    res = simulate(Driver(sessions, plan), strategy_knobs(RAY_TWIN), ClusterSpec(4, ingresses=2), engine)
    assert res.completed == 800
    counts = sorted(res.per_replica.values())
    assert counts[0] > 0.6 * counts[-1]  # documents spread over tenants, as the GPU run saw
    assert res.cached_tokens / res.prompt_tokens > 0.8  # each document is computed about once, not once per ingress


def test_calibration_maps_the_ray_system_to_the_twin():
    doc = {"scale_settings": {"workloads": {"docqa": ["--workload", "docqa"]}},
           "systems": {"ray": {"routing": {"request_router_class":
                                           "benchmarks.routing_h2h.ray_router:RayPrefixCacheAffinity"}}},
           "results": {"ray": {"ingress_replicas": 2, "docqa": {"sat": {
               "ttft_p50_ms": 78.0, "load": {"mode": "concurrency", "concurrency": 64, "duration_s": 30}}}}}}
    (cell,) = gpu_cells(doc)
    assert cell.strategy == RAY_TWIN and cell.ingresses == 2 and cell.name == "ray"


def test_a_traced_ray_system_is_the_twin_and_one_with_its_guard_on_is_not_modelled():
    cell = {"ttft_p50_ms": 78.0, "load": {"mode": "concurrency", "concurrency": 64, "duration_s": 30}}
    cls = "benchmarks.routing_h2h.ray_router:RayPrefixCacheAffinity"
    doc = {"scale_settings": {"workloads": {"docqa": ["--workload", "docqa"]}},
           "systems": {"ray": {"routing": {"request_router_class": cls}},
                       "ray-guard": {"routing": {"request_router_class": cls,
                                                 "request_router_kwargs": {"imbalanced_threshold": 8}}}},
           "results": {"ray": {"routing": {"request_router_class": cls, "request_router_kwargs": {"trace_dir": "/t"}},
                               "docqa": {"sat": cell}},
                       "ray-guard": {"docqa": {"sat": cell}}}}
    (only,) = gpu_cells(doc)
    assert only.name == "ray" and only.strategy == RAY_TWIN


def test_a_ray_cell_starts_from_the_tree_its_runs_earlier_cells_left():
    """One deployment serves a run's cells in turn and Ray's tree actor keeps what they routed: the twin's
    multiturn cell is simulated after the docqa cell its run measured first, on the same tree."""
    cls = "benchmarks.routing_h2h.ray_router:RayPrefixCacheAffinity"
    load = {"mode": "concurrency", "concurrency": 8, "duration_s": 3}
    wl = {"docqa": ["--workload", "docqa", "--docs", "4", "--doc-tokens", "256:512", "--output-len", "8"],
          "multiturn": ["--workload", "multiturn", "--sessions", "8", "--turns", "2", "--system-words", "64",
                        "--user-words", "8:16", "--output-len", "8"]}
    cell = {"ttft_p50_ms": 10.0, "load": load}
    doc = {"scale_settings": {"workloads": wl},
           "systems": {"ray": {"routing": {"request_router_class": cls}}, "kv-aware": {"routing": {}}},
           "results": {"ray": {"runs": [{"cells": ["multiturn:sat"]}, {"cells": ["docqa:sat", "multiturn:sat"]}],
                               "docqa": {"sat": cell}, "multiturn": {"sat": cell}},
                       "kv-aware": {"runs": [{"cells": ["docqa:sat", "multiturn:sat"]}],
                                    "docqa": {"sat": cell}, "multiturn": {"sat": cell}}}}
    cells = {(c.name, c.workload): c for c in gpu_cells(doc)}
    ray_docqa, ray_multiturn = cells["ray", "docqa"], cells["ray", "multiturn"]
    assert ray_docqa.before == () and ray_multiturn.before == (ray_docqa,)  # the last run listing it decides
    assert cells["kv-aware", "multiturn"].before == ()  # only Ray's tree is carried
    # a later run cut by its limit after docqa: multiturn's cell is still the earlier run's, which ran it first
    doc["results"]["ray"]["runs"] = [{"cells": ["multiturn:sat", "docqa:sat"]},
                                     {"cells": ["docqa:sat", "multiturn:sat"], "done": ["docqa:sat"]}]
    cut = {c.workload: c for c in gpu_cells(doc) if c.name == "ray"}
    assert cut["multiturn"].before == () and cut["docqa"].before == ()

    engine = EngineModel(prefill_tokens_per_s=50_000, step_s=0.005, kv_blocks=2048)
    knobs, spec = strategy_knobs(RAY_TWIN), ClusterSpec(4)
    tree = RayTree()
    simulate(Driver(workloads.docqa_sessions(docs=4, doc_tokens=(256, 512), output_len=8),
                    LoadPlan("concurrency", 8, num_requests=16)), knobs, spec, engine, ray_tree=tree)
    after_docqa = dict(tree.tokens)
    assert sum(after_docqa.values()) > 0
    simulate(Driver(workloads.multiturn_sessions(sessions=4, turns=1, system_words=64, user_words=(8, 16),
                                                 output_len=8),
                    LoadPlan("concurrency", 1, num_requests=1)), knobs, spec, engine, ray_tree=tree)
    (grown,) = [r for r in tree.tokens if tree.tokens[r] > after_docqa.get(r, 0)]
    assert after_docqa[grown] == min(after_docqa.values())  # the new session went to docqa's smallest tenant
