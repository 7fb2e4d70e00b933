"""Policy decisions on crafted snapshots: affinity, imbalance guard, ties, sessions, removal, tiers."""

from __future__ import annotations

import dataclasses
import random

import pytest
from routers_factories import doc, policy, request, snaps

from routers.events import AllBlocksCleared, BlockRemoved, BlockStored
from routers.policy import REASONS, STRATEGIES
from routers.types import ReplicaSnapshot

pytestmark = pytest.mark.unit


def _route(p, req, ss, now=0.0, rng=None):
    d = p.choose(req, ss, now, rng or random.Random(0))
    p.on_routed(req, next(s for s in ss if s.replica_id == d.replica_id), now)
    return d


def test_shared_prefix_sticks_to_the_replica_that_has_it():
    p, ss = policy(), snaps(4)
    first = _route(p, request(doc(1) + [7, 7, 7]), ss)
    assert first.reason == "no-cache"
    again = p.choose(request(doc(1) + [9, 9, 9, 9]), ss, 1.0, random.Random(1))
    assert again.replica_id == first.replica_id
    assert again.reason == "cache-hit"
    assert again.predicted_cached_tokens == 256


def test_cold_prompts_go_to_the_least_queued_replica():
    p = policy()
    ss = [ReplicaSnapshot("a", queued_prefill_tokens=5000), ReplicaSnapshot("b", queued_prefill_tokens=100)]
    d = p.choose(request(doc(2)), ss, 0.0, random.Random(0))
    assert (d.replica_id, d.reason) == ("b", "no-cache")
    assert d.scores["a"] > d.scores["b"]


def test_load_beats_affinity_when_the_queue_costs_more_than_the_prefix():
    p = policy()
    ss = [ReplicaSnapshot("a"), ReplicaSnapshot("b")]
    _route(p, request(doc(3)), [ss[0]])  # the prefix lives on a
    busy = [dataclasses.replace(ss[0], queued_prefill_tokens=10_000), ss[1]]
    d = p.choose(request(doc(3) + [1] * 16), busy, 1.0, random.Random(0))
    assert (d.replica_id, d.reason) == ("b", "load-over-affinity")
    light = [dataclasses.replace(ss[0], queued_prefill_tokens=100), ss[1]]
    assert p.choose(request(doc(3) + [1] * 16), light, 1.0, random.Random(0)).replica_id == "a"


def test_imbalance_guard_needs_absolute_and_relative_gap():
    p = policy(balance_abs_requests=8, balance_rel=1.5, running_request_tokens=0)
    _route(p, request(doc(4)), [ReplicaSnapshot("a")])
    req = request(doc(4) + [5] * 16)
    hot = [ReplicaSnapshot("a", running=20), ReplicaSnapshot("b", running=10)]  # gap 10 > 8, 20 > 15
    d = p.choose(req, hot, 1.0, random.Random(0))
    assert (d.replica_id, d.reason) == ("b", "imbalance-guard")
    rel_ok = [ReplicaSnapshot("a", running=20), ReplicaSnapshot("b", running=14)]  # 20 < 1.5 x 14
    assert p.choose(req, rel_ok, 1.0, random.Random(0)).replica_id == "a"
    abs_ok = [ReplicaSnapshot("a", running=8), ReplicaSnapshot("b", running=0)]  # gap 8, not > 8
    assert p.choose(req, abs_ok, 1.0, random.Random(0)).replica_id == "a"


def test_guard_keeps_affinity_among_cool_replicas():
    p = policy(balance_abs_requests=4, running_request_tokens=0)
    _route(p, request(doc(5)), [ReplicaSnapshot("b")])
    ss = [ReplicaSnapshot("a", running=30), ReplicaSnapshot("b", running=1), ReplicaSnapshot("c", running=0)]
    d = p.choose(request(doc(5) + [3] * 16), ss, 1.0, random.Random(0))
    assert (d.replica_id, d.reason) == ("b", "cache-hit")


def test_exact_ties_are_broken_by_the_rng_only():
    p, ss = policy(), snaps(4)
    picks = {p.choose(request(doc(6)), ss, 0.0, random.Random(seed)).replica_id for seed in range(40)}
    assert picks == {"r0", "r1", "r2", "r3"}
    same = [p.choose(request(doc(6)), ss, 0.0, random.Random(7)).replica_id for _ in range(3)]
    assert len(set(same)) == 1


def test_removed_replica_is_never_chosen_and_its_entries_are_gone():
    p, ss = policy(), snaps(3)
    first = _route(p, request(doc(8)), ss)
    p.remove_replica(first.replica_id)
    rest = [s for s in ss if s.replica_id != first.replica_id]
    d = p.choose(request(doc(8)), rest, 1.0, random.Random(0))
    assert d.replica_id != first.replica_id and d.reason == "no-cache"
    assert p.approx.size(first.replica_id) == 0


def test_replicas_at_max_ongoing_are_skipped_unless_all_are():
    p = policy()
    _route(p, request(doc(9)), [ReplicaSnapshot("a")])
    ss = [ReplicaSnapshot("a", running=4, max_ongoing=4), ReplicaSnapshot("b", max_ongoing=4)]
    assert p.choose(request(doc(9)), ss, 1.0, random.Random(0)).replica_id == "b"
    full = [ReplicaSnapshot("a", running=4, max_ongoing=4), ReplicaSnapshot("b", running=4, max_ongoing=4)]
    assert p.choose(request(doc(9)), full, 1.0, random.Random(0)).replica_id == "a"


def test_session_affinity_is_stable_and_yields_to_the_guard():
    p = policy(session_affinity=True, balance_abs_requests=4)
    ss = snaps(4)
    picks = {p.choose(request(doc(i), session="user-1"), ss, 0.0, random.Random(i)).replica_id for i in range(10)}
    assert len(picks) == 1
    pinned = picks.pop()
    d = p.choose(request(doc(0), session="user-1"), ss, 0.0, random.Random(0))
    assert d.reason == "session"
    hot = [dataclasses.replace(s, running=50 if s.replica_id == pinned else 0) for s in ss]
    d = p.choose(request(doc(0), session="user-1"), hot, 0.0, random.Random(0))
    assert d.replica_id != pinned and d.reason == "imbalance-guard"


def test_no_stats_anywhere_degrades_to_least_loaded():
    p = policy()
    ss = [ReplicaSnapshot("a", running=3, has_stats=False), ReplicaSnapshot("b", running=1, has_stats=False)]
    d = p.choose(request(doc(10)), ss, 0.0, random.Random(0))
    assert (d.replica_id, d.reason) == ("b", "no-stats")


def test_round_robin_and_least_loaded():
    rr = policy("round-robin")
    ss = snaps(3)
    assert [rr.choose(request(doc(0)), ss, 0.0, random.Random(0)).replica_id for _ in range(4)] == [
        "r0", "r1", "r2", "r0"
    ]
    ll = policy("least-loaded")
    ss = [ReplicaSnapshot("a", queued_prefill_tokens=50), ReplicaSnapshot("b")]
    assert ll.choose(request(doc(0)), ss, 0.0, random.Random(0)).replica_id == "b"


def test_kv_aware_follows_evictions_and_tiers():
    p = policy("kv-aware", speculative_ttl_s=2.0)
    ss = snaps(2)
    req = request(doc(11))
    p.precise.mark_live("r0"), p.precise.mark_live("r1")
    for e in (BlockStored(req.block_hashes, "GPU"),):
        p.on_event("r1", e)
    d = p.choose(req, ss, 0.0, random.Random(0))
    assert (d.replica_id, d.reason) == ("r1", "cache-hit")
    p.on_event("r1", AllBlocksCleared())  # reset_prefix_cache on r1
    d = p.choose(req, ss, 10.0, random.Random(0))
    assert d.reason == "no-cache"
    p.on_event("r0", BlockStored(req.block_hashes, "CPU"))  # only in r0's host tier
    d = p.choose(req, ss, 10.0, random.Random(0))
    assert d.replica_id == "r0" and d.predicted_cached_tokens == 255


def test_kv_aware_stops_predicting_obj_hits_after_the_tier_directory_restarts():
    p = policy("kv-aware", speculative_ttl_s=2.0)
    ss = snaps(2)
    req, other = request(doc(13)), request(doc(14))
    p.precise.mark_live("r0"), p.precise.mark_live("r1")
    p.on_event("r0", BlockStored(req.block_hashes, "OBJ", epoch=1))
    p.on_event("r1", BlockStored(other.block_hashes[:4], "GPU"))
    d = p.choose(req, ss, 10.0, random.Random(0))
    assert d.predicted_cached_tokens == 255  # every replica can load the tier's blocks
    p.on_event("r1", BlockStored(request(doc(15)).block_hashes[:1], "OBJ", epoch=2))  # first store after a restart
    d = p.choose(req, ss, 10.0, random.Random(0))
    assert (d.reason, d.predicted_cached_tokens) == ("no-cache", 0)
    d = p.choose(other, ss, 10.0, random.Random(0))
    assert (d.replica_id, d.reason, d.predicted_cached_tokens) == ("r1", "cache-hit", 64)  # GPU entries kept


def test_kv_aware_speculates_on_just_routed_blocks_then_trusts_events():
    p = policy("kv-aware", speculative_ttl_s=2.0)
    ss = snaps(2)
    p.precise.mark_live("r0"), p.precise.mark_live("r1")
    req = request(doc(12))
    first = _route(p, req, ss, now=0.0)
    assert p.choose(req, ss, 1.0, random.Random(5)).replica_id == first.replica_id  # events not in yet
    p.on_event(first.replica_id, BlockStored(req.block_hashes, "GPU"))
    p.on_event(first.replica_id, BlockRemoved(req.block_hashes, "GPU"))  # evicted since
    assert p.choose(req, ss, 5.0, random.Random(5)).reason == "no-cache"


def test_reasons_and_strategies_are_a_closed_set():
    assert set(STRATEGIES) == {"prefix-aware", "kv-aware", "round-robin", "least-loaded"}
    p, ss = policy(), snaps(3)
    for i in range(20):
        assert _route(p, request(doc(i % 3)), ss, now=float(i)).reason in REASONS
    with pytest.raises(ValueError):
        policy("random")


def test_unmeasured_replica_is_costed_at_its_peers_speed_not_the_default():
    # The holder measured 1k tok/s (slow CPU); an empty, unmeasured peer must not look 10x faster.
    p = policy()
    holder, cold = (dataclasses.replace(s, prefill_tokens_per_s=rate)
                    for s, rate in zip(snaps(2), (1000.0, 0.0)))
    first = _route(p, request(doc(3) + [1]), [holder, dataclasses.replace(cold, queued_prefill_tokens=10**6)])
    assert first.replica_id == holder.replica_id
    # 160 new tokens: at the 10k tok/s default the cold peer would look cheaper than the 1k tok/s holder.
    again = p.choose(request(doc(3) + [2] * 160), [holder, cold], 1.0, random.Random(0))
    assert again.replica_id == holder.replica_id and again.reason == "cache-hit"


def test_a_busy_holder_measured_slower_keeps_its_cached_prompt():
    # Measured under load the holder looks 4x slower than its idle peer; both run the same model on the
    # same hardware, so one speed costs both and the cached 1,024 tokens keep the prompt at the holder.
    p = policy()
    holder, peer = snaps(2)
    _route(p, request(doc(3, 1024)), [holder, dataclasses.replace(peer, queued_prefill_tokens=10**6)])
    busy = dataclasses.replace(holder, prefill_tokens_per_s=500.0, queued_prefill_tokens=600)
    idle = dataclasses.replace(peer, prefill_tokens_per_s=2000.0)
    d = p.choose(request(doc(3, 1024) + [7] * 76), [busy, idle], 1.0, random.Random(0))
    assert d.replica_id == holder.replica_id and d.reason == "cache-hit"
