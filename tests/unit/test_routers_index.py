"""Approximate (LRU) and precise (KV-event) indexes: bounds, eviction order, tiers, removal."""

from __future__ import annotations

import pytest

from routers.approx_index import ApproxIndex, Slots, longest_prefix
from routers.events import AllBlocksCleared, BlockRemoved, BlockStored
from routers.precise_index import GPU, HOST, OBJ, PreciseIndex, TierMatch

pytestmark = pytest.mark.unit


def test_longest_prefix_stops_at_first_missing_block():
    slots = Slots()
    a, b, c = slots.bit("a"), slots.bit("b"), slots.bit("c")
    holders = {1: a | b, 2: a | b, 3: a, 5: a | b}
    assert longest_prefix([1, 2, 3, 4, 5], holders.get, a | b | c, slots) == {"a": 3, "b": 2}
    assert longest_prefix([9, 1], holders.get, a, slots) == {}
    assert longest_prefix([], holders.get, a, slots) == {}
    slots.release("b")
    assert slots.bit("d") == b and list(slots.ids(a | b)) == ["a", "d"]


def test_lru_is_bounded_by_capacity_and_evicts_tail_blocks_first():
    idx = ApproxIndex(default_capacity_blocks=4)
    idx.on_routed("a", [1, 2, 3], now=0.0)
    assert idx.lru_order("a") == [3, 2, 1]  # root most recent: a prefix's tail goes first
    idx.on_routed("a", [10, 11, 12], now=1.0)
    assert idx.size("a") == 4
    assert idx.lru_order("a") == [1, 12, 11, 10]
    assert idx.match([1, 2, 3], ["a"]) == {"a": 1}
    assert idx.match([10, 11, 12], ["a"]) == {"a": 3}


def test_capacity_from_kv_blocks_and_factor_shrinks_at_once():
    idx = ApproxIndex(capacity_factor=0.5, default_capacity_blocks=100)
    idx.on_routed("a", list(range(50)), now=0.0)
    idx.set_capacity("a", kv_capacity_blocks=20)
    assert idx.capacity("a") == 10 and idx.size("a") == 10
    assert idx.match(list(range(50)), ["a"]) == {"a": 10}


def test_touch_refreshes_recency():
    idx = ApproxIndex(default_capacity_blocks=3)
    idx.on_routed("a", [1], now=0.0)
    idx.on_routed("a", [2], now=1.0)
    idx.on_routed("a", [1], now=2.0)
    idx.on_routed("a", [3, 4], now=3.0)
    assert idx.lru_order("a") == [1, 4, 3]
    assert idx.last_routed("a", 1) == 2.0


def test_remove_replica_drops_all_entries_and_reverse_map():
    idx = ApproxIndex(default_capacity_blocks=10)
    idx.on_routed("a", [1, 2], now=0.0)
    idx.on_routed("b", [1, 2], now=0.0)
    idx.remove_replica("a")
    assert idx.match([1, 2], ["a", "b"]) == {"b": 2}
    idx.remove_replica("b")
    assert idx.size() == 0 and idx._holders == {}
    idx.remove_replica("never-seen")  # no error


def test_memory_stays_bounded_over_many_requests():
    idx = ApproxIndex(default_capacity_blocks=1000)
    for i in range(200):
        idx.on_routed(f"r{i % 4}", list(range(i * 100, i * 100 + 100)), now=float(i))
    assert idx.size() == 4000
    assert len(idx._holders) == 4000


def test_precise_tiers_and_match():
    idx = PreciseIndex()
    idx.on_event("a", BlockStored((1, 2, 3), "GPU"))
    idx.on_event("b", BlockStored((1,), "GPU"))
    idx.on_event("b", BlockStored((2,), "CPU"))
    idx.on_event("c", BlockStored((1, 2, 3, 4), "OBJ"))
    m = idx.match([1, 2, 3, 4, 5], ["a", "b", "d"])
    assert m["a"] == TierMatch(3, 0, 1)  # block 4 loadable from the shared object store
    assert m["b"] == TierMatch(1, 1, 2)
    assert m["d"] == TierMatch(0, 0, 4)  # OBJ counts for every replica


def test_precise_removed_and_cleared():
    idx = PreciseIndex()
    idx.on_event("a", BlockStored((1, 2, 3), "GPU"))
    idx.on_event("a", BlockStored((1, 2), "OBJ"))
    idx.on_event("a", BlockRemoved((3,), "GPU"))
    assert idx.match([1, 2, 3], ["a"]) == {"a": TierMatch(2, 0, 0)}
    idx.on_event("a", AllBlocksCleared())
    assert idx.match([1, 2, 3], ["a", "b"]) == {"a": TierMatch(0, 0, 2), "b": TierMatch(0, 0, 2)}
    idx.remove_replica("a")
    assert idx.match([1, 2, 3], ["a", "b"]) == {} and idx.size() == 0
    assert not idx.is_live("a")


def test_precise_is_bounded_per_replica():
    idx = PreciseIndex(max_blocks_per_replica=5)
    idx.on_event("a", BlockStored(tuple(range(8)), "GPU"))
    assert idx.size("a") == 5
    assert not idx.holds("a", 0) and idx.holds("a", 7)


def test_precise_forgets_obj_blocks_of_an_older_directory_epoch():
    idx = PreciseIndex()
    idx.on_event("a", BlockStored((1, 2), "GPU"))
    idx.on_event("b", BlockStored((9,), "CPU"))
    idx.on_event("a", BlockStored((1, 2, 3, 4), "OBJ", epoch=100))
    idx.on_event("b", BlockStored((5, 6), "OBJ", epoch=100))
    assert idx.match([1, 2, 3, 4], ["a", "b"]) == {"a": TierMatch(2, 0, 2), "b": TierMatch(0, 0, 4)}
    # The directory restarted (epoch 200): its first event drops every replica's OBJ entries.
    idx.on_event("b", BlockStored((7,), "OBJ", epoch=200))
    assert idx.obj_epoch == 200
    assert idx.match([1, 2, 3, 4], ["a", "b"]) == {"a": TierMatch(2, 0, 0)}  # GPU entries untouched
    assert idx.match([5, 6], ["a", "b"]) == {}
    assert idx.holds("b", 9, HOST) and idx.holds("a", 2, GPU) and idx.holds("b", 7, OBJ)
    assert idx.size("a") == 2 and idx.size("b") == 2
    # A late (replayed) event of the old directory changes nothing; one without an epoch is current.
    idx.on_event("a", BlockStored((1, 2, 3, 4), "OBJ", epoch=100))
    idx.on_event("a", BlockRemoved((7,), "OBJ", epoch=100))
    assert idx.match([1, 2, 3, 4], ["b"]) == {} and idx.holds("b", 7, OBJ)
    idx.on_event("a", BlockStored((1, 2, 3), "OBJ"))
    assert idx.match([1, 2, 3, 4], ["a"]) == {"a": TierMatch(2, 0, 1)}
    idx.on_event("a", BlockRemoved((3,), "OBJ", epoch=200))
    assert idx.match([1, 2, 3, 4], ["a"]) == {"a": TierMatch(2, 0, 0)}


def test_precise_keeps_unlabelled_obj_blocks_when_it_learns_the_first_epoch():
    idx = PreciseIndex()
    idx.on_event("a", BlockStored((1, 2), "OBJ"))  # an engine that has not polled its directory yet
    idx.on_event("b", BlockStored((3,), "OBJ", epoch=5))
    assert idx.obj_epoch == 5 and idx.match([1, 2, 3], ["c"]) == {"c": TierMatch(0, 0, 3)}


def test_precise_evicts_oldest_stored_in_batches_and_stays_under_its_cap():
    idx = PreciseIndex(max_blocks_per_replica=128)
    idx.on_event("a", BlockStored(tuple(range(128)), "GPU"))
    assert idx.size("a") == 128
    idx.on_event("a", BlockStored((1000,), "GPU"))  # one over: the oldest 1/64 of the cap goes with it
    assert idx.size("a") == 126
    assert not idx.holds("a", 0) and not idx.holds("a", 2) and idx.holds("a", 3) and idx.holds("a", 1000)
    assert idx.match([3, 4], ["a"]) == {"a": TierMatch(2, 0, 0)}
