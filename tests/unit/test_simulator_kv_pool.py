"""The simulated replica's KV block pool under ``kv_admission``, as vLLM's scheduler and block pool keep it:
blocks held never exceed the capacity, a request that fits alone is admitted (evicting unreferenced
cached blocks, oldest first, never held ones), and the waiting queue is admitted in order (FCFS)."""

from __future__ import annotations

import pytest

from benchmarks.simulator import workloads
from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.load import Driver, LoadPlan, Turn
from benchmarks.simulator.replica import Job, Replica
from benchmarks.simulator.scheduler import Scheduler
from benchmarks.simulator.sim import ClusterSpec, simulate
from serve_app.config.routing import RoutingConfig

pytestmark = pytest.mark.unit

ENGINE = EngineModel(prefill_tokens_per_s=20_000, step_s=0.005, kv_blocks=300, block_size=16, kv_admission=True)


def job(first: int, blocks: int, output: int = 16) -> Job:
    return Job(Turn(16 * blocks, output, tuple(range(first, first + blocks))))


def run_watched(monkeypatch, engine: EngineModel, replicas: int = 1, docs: int = 32, clients: int = 12):
    """Run docqa under admission, recording every admission and the pool after every scheduling pass."""
    admitted, pools = [], []
    admit, kick = Replica.admit, Scheduler.kick

    def watch_admit(rep, j, capacity, block_size):
        ok = admit(rep, j, capacity, block_size)
        if ok:
            admitted.append((rep.rid, j))
        return ok

    def watch_kick(self, rep, now):
        kick(self, rep, now)
        pools.append((rep.held_blocks, rep.pool_blocks, len(rep.held)))

    monkeypatch.setattr(Replica, "admit", watch_admit)
    monkeypatch.setattr(Scheduler, "kick", watch_kick)
    sessions = workloads.docqa_sessions(docs=docs, doc_tokens=(1024, 2048), output_len=16)
    knobs = RoutingConfig(strategy="round-robin", prefill_s_per_token=1 / 20_000).knobs()
    res = simulate(Driver(sessions, LoadPlan("concurrency", clients, num_requests=150)), knobs,
                   ClusterSpec(replicas), engine)
    return res, admitted, pools


def test_blocks_held_never_exceed_capacity_and_the_pool_fits(monkeypatch):
    res, admitted, pools = run_watched(monkeypatch, ENGINE)
    assert res.completed == res.sent == 150 and len(admitted) == 150
    assert max(held for held, _, _ in pools) <= ENGINE.kv_blocks
    assert max(pool for _, pool, _ in pools) <= ENGINE.kv_blocks
    assert max(held for held, _, _ in pools) > ENGINE.kv_blocks // 2  # the cap was reached, not idle


def test_the_waiting_queue_is_admitted_in_order(monkeypatch):
    _, admitted, _ = run_watched(monkeypatch, ENGINE, replicas=2)
    for rid in ("r0000", "r0001"):
        sent = [j.turn.sent_at for r, j in admitted if r == rid]
        assert sent and sent == sorted(sent)  # no request overtakes one queued before it


def test_a_request_that_fits_alone_is_admitted_and_evicts_only_unreferenced_blocks_oldest_first():
    rep = Replica("r0", 0, capacity_blocks=10)
    rep.insert(tuple(range(100, 110)))  # the cache is full of unreferenced blocks (110..100 by age: 109 oldest)
    a = job(1, 4)  # 4 prompt blocks + 1 for its output
    assert rep.admit(a, 10, 16) and rep.held_blocks == 5
    assert rep.evict_unreferenced() == [109, 108, 107, 106, 105]
    assert rep.pool_blocks == 10
    rep.insert(a.turn.block_hashes)  # its prefill finished: its blocks are cached, still held
    assert rep.pool_blocks == 10 and rep.gpu_prefix((1, 2, 3, 4)) == 4
    b = job(200, 5)  # 5 + 1 blocks do not fit beside the 5 held
    assert not rep.admit(b, 10, 16) and not b.admitted
    rep.release(a)  # a's blocks become evictable: its head last
    assert rep.admit(b, 10, 16) and rep.held_blocks == 6
    assert rep.evict_unreferenced() == [104, 103, 102, 101, 100]  # a's output block was freed, not cached
    assert rep.pool_blocks == 10 and rep.gpu_prefix((1, 2, 3, 4)) == 4
    rep.insert(b.turn.block_hashes)
    rep.release(b)
    c = job(300, 9)  # 9 + 1: room for it only by evicting a's and b's cached blocks, oldest first
    assert rep.admit(c, 10, 16)
    assert rep.evict_unreferenced() == [4, 3, 2, 1, 204, 203, 202, 201, 200]
    assert rep.pool_blocks == 10


def test_a_reused_cached_prefix_is_held_once_and_never_evicted_under_its_holders():
    rep = Replica("r0", 0, capacity_blocks=8)
    rep.insert((1, 2, 3, 4))
    a, b = job(1, 4), Job(Turn(16 * 5, 16, (1, 2, 3, 4, 9)))
    assert rep.admit(a, 8, 16) and rep.admit(b, 8, 16)
    assert rep.held_blocks == 5 + 2  # the shared four once, b's fifth, one output block each
    assert rep.evict_unreferenced() == [] and rep.pool_blocks == 7
    rep.insert((50, 51, 52))  # over capacity: only unreferenced blocks may go
    assert all(h in rep.lru for h in (1, 2, 3, 4)) and rep.pool_blocks <= 8
