"""The KV tier's directory: LRU order, byte budget, owners, the load records it keeps (pure; the actor's load
report is called as a plain object, no Ray cluster)."""

from __future__ import annotations

import pytest

from deployments.kv_tier.directory import LOAD_PHASES, BlockDirectory, LoadLog, LoadRecord
from deployments.kv_tier.plan import hit_run, loadable_blocks, store_ranges

pytestmark = pytest.mark.unit


def _keys(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


def _dir_with(*chunks: tuple[str, int], budget: int = 300, owner: str = "A") -> BlockDirectory:
    d = BlockDirectory(budget)
    for prefix, nbytes in chunks:
        assert d.add_chunk(owner, _keys(prefix, 2), f"ref-{prefix}", nbytes)
    return d


def test_add_and_locate():
    d = _dir_with(("a", 100))
    (loc,) = d.locate([b"a0", b"a1", b"x", b"a0"])  # one entry per chunk; nothing past the first absent key
    assert (loc.ref, loc.owner, loc.src, loc.pos) == ("ref-a", "A", (0, 1), (0, 1))
    assert d.stats()["bytes_used"] == 100 and d.stats()["blocks"] == 2


def test_budget_evicts_least_recently_used_chunk_first():
    d = _dir_with(("a", 100), ("b", 100), ("c", 100))  # full: 300 / 300
    assert d.lookup([b"a0"]) == [True]  # touch a -> LRU order b, c, a
    assert d.lru_chunk_ids() == [1, 2, 0]
    assert d.add_chunk("A", _keys("d", 2), "ref-d", 150)  # needs 150: evicts b and c
    assert d.lookup([b"a0", b"b0", b"c0", b"d0"]) == [True, False, False, True]
    s = d.stats()
    assert s["bytes_used"] == 250 <= s["budget_bytes"]
    assert s["chunks_evicted"] == 2 and s["blocks_evicted"] == 4
    assert sorted(d.take_evicted("A")) == [b"b0", b"b1", b"c0", b"c1"]


def test_evicted_feed_per_owner_is_drained_once():
    d = BlockDirectory(100)
    d.add_chunk("A", [b"a0"], "ra", 100)
    d.add_chunk("B", [b"b0"], "rb", 100)
    assert d.take_evicted("A") == [b"a0"]
    assert d.take_evicted("A") == []
    assert d.take_evicted("B") == []


def test_the_eviction_poll_names_the_directory_epoch():
    d = BlockDirectory(100, epoch=1733200000123)
    d.add_chunk("A", [b"a0"], "ra", 100)
    d.add_chunk("A", [b"a1"], "ra1", 100)
    assert d.poll_evicted("A") == (1733200000123, [b"a0"])
    assert d.poll_evicted("A") == (1733200000123, []) and d.stats()["epoch"] == 1733200000123


def test_bytes_never_exceed_budget_under_churn():
    d = BlockDirectory(1000)
    for i in range(200):
        d.add_chunk("A", [f"k{i}".encode()], i, 37 + (i * 13) % 300)
        assert d.bytes_used <= d.budget_bytes


def test_oversized_and_duplicate_chunks_are_rejected():
    d = _dir_with(("a", 100))
    assert not d.add_chunk("A", [b"z"], "big", 301)
    assert not d.add_chunk("B", [b"a0", b"a1"], "dup", 100)  # nothing new: not charged
    assert d.stats()["bytes_used"] == 100 and d.stats()["chunks_rejected"] == 2
    # Partially new: only the new key maps to the new chunk; the old mapping wins.
    assert d.add_chunk("B", [b"a1", b"n"], "ref-n", 50)
    assert [(l.ref, l.src, l.pos) for l in d.locate([b"a1", b"n"])] == [("ref-a", (1,), (0,)), ("ref-n", (1,), (1,))]


def test_drop_owner_and_lost_keys():
    d = _dir_with(("a", 100), ("b", 100))
    d.add_chunk("B", _keys("c", 2), "ref-c", 50)
    assert d.drop_owner("A") == 4
    assert d.lookup([b"a0", b"b1", b"c0"]) == [False, False, True]
    assert d.drop_keys([b"c0"]) == 1 and d.stats()["chunks"] == 1  # c1 still live
    assert d.drop_keys([b"c1"]) == 1 and d.stats()["chunks"] == 0 and d.bytes_used == 0
    assert d.stats()["blocks_lost"] == 6


def test_drop_chunk_and_clear():
    d = _dir_with(("a", 100), ("b", 100))
    assert d.drop_chunk(0) == 2 and d.drop_chunk(0) == 0
    d.clear()
    assert d.stats()["blocks"] == 0 and d.bytes_used == 0


def test_budget_must_be_positive():
    with pytest.raises(ValueError):
        BlockDirectory(0)


# --- scheduler-side block arithmetic ---------------------------------------------------------
def test_loadable_blocks_leave_the_last_token():
    assert loadable_blocks(512, 128) == 3  # a full hit still computes one token
    assert loadable_blocks(513, 128) == 4
    assert loadable_blocks(1, 128) == 0


def test_hit_run_counts_consecutive_blocks_from_start():
    present = [True, True, False, True, True, True]
    assert hit_run(present, 0, 6) == 2
    assert hit_run(present, 3, 6) == 3
    assert hit_run(present, 3, 5) == 2
    assert hit_run(present, 2, 6) == 0


def test_store_ranges_chunking_and_progress():
    ranges, nxt = store_ranges(0, computed_tokens=700, num_prompt_tokens=700, block_size=128, chunk_blocks=2)
    assert ranges == [(0, 2), (2, 4), (4, 5)] and nxt == 5
    # Chunked prefill: only blocks full after this step; decode tokens never count.
    assert store_ranges(0, 300, 700, 128, 8) == ([(0, 2)], 2)
    assert store_ranges(2, 900, 700, 128, 8) == ([(2, 5)], 5)
    assert store_ranges(5, 1000, 700, 128, 8) == ([], 5)


def _rec(ms: float, queue: float, locate: float, get: float, copy: float, nbytes: int = 100, failed: int = 0):
    return LoadRecord(nbytes, ms, failed, queue_ms=queue, locate_ms=locate, get_ms=get, copy_ms=copy)


def test_load_log_keeps_the_last_records_and_sums_every_loads_phases():
    log = LoadLog(keep=2)
    assert log.summary() == {"loads": 0, "bytes": 0, "failed_blocks": 0,
                             "ms_total": dict.fromkeys(("total", *LOAD_PHASES), 0.0),
                             "ms_mean": dict.fromkeys(("total", *LOAD_PHASES))}
    for rec in (_rec(10, 1, 2, 3, 4), _rec(20, 2, 4, 6, 8, failed=3), _rec(60, 0, 10, 20, 30, nbytes=300)):
        log.add(rec)
    assert [r.ms for r in log.recent()] == [20, 60]  # bounded: the oldest went
    assert log.recent()[-1].phases_ms() == {"queue": 0, "locate": 10, "get": 20, "copy": 30}
    assert log.summary() == {
        "loads": 3, "bytes": 500, "failed_blocks": 3,
        "ms_total": {"total": 90.0, "queue": 3.0, "locate": 16.0, "get": 29.0, "copy": 42.0},
        "ms_mean": {"total": 30.0, "queue": 1.0, "locate": 5.333, "get": 9.667, "copy": 14.0}}
    with pytest.raises(ValueError):
        LoadLog(keep=0)


def test_the_directory_actor_reports_load_records_and_their_phase_sums():
    pytest.importorskip("ray")
    from deployments.kv_tier.directory_actor import DirectoryActor

    d = DirectoryActor(1000, "m")  # the class Ray wraps, called as a plain object
    d.note_load(_rec(10, 1, 2, 3, 4))
    d.note_load(LoadRecord(7, 5.0, 2))  # an older worker: no phases -> zeros
    assert d.recent_loads()[0] == {"nbytes": 100, "ms": 10, "failed_blocks": 0, "direct_chunks": 0, "into_pages": 0,
                                   "queue_ms": 1, "locate_ms": 2, "get_ms": 3, "copy_ms": 4}
    s = d.stats()
    assert s["blocks"] == 0 and s["loads"]["loads"] == 2 and s["loads"]["bytes"] == 107
    assert s["loads"]["ms_mean"] == {"total": 7.5, "queue": 0.5, "locate": 1.0, "get": 1.5, "copy": 2.0}
