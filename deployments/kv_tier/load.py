"""Load: fetch chunks from Ray's object store into allocated blocks, several chunks in parallel.

Owns: ``Loader``.

GPU path (designed for the H100 numbers in the notes; the CPU path runs the same code without
streams): ``load_threads`` threads, one chunk each: ``ray.get`` (a zero-copy view of plasma), one
H2D copy of the whole chunk into a device slot (``pages.make_slots``), then one ``_foreach_copy_``
into every layer's pages when the target blocks form a few runs of consecutive ids
(``pages.scatter_runs``; else ``index_copy_`` per layer), all on the thread's stream. How the H2D
copy reads the chunk is ``KVTierConfig.host_dma`` (``host_memory`` has the modes and their
costs): straight from plasma where it is page-locked (the whole object store, registered once by
a background thread at start, or the chunk alone), else through the slot's pinned host buffer.
With ``mapping``, a load first fetches all its chunks with one ``ray.get``, and the chunks that lie
in the registered store and land in a few runs of blocks are copied H2D straight into the pages
by the load's own thread (``_load_direct``); only the rest go to the threads above. A lost chunk
(``shared.LOST_ERRORS``) is a miss: its blocks are reported as failed (vLLM recomputes them) and the
directory drops that owner or chunk.

Up to ``KVTierConfig.parallel_loads`` loads run at once, each on its own coordinator thread (the
locate, the one ``ray.get``, the direct copies); later ones wait for a free one (the ``queue`` phase).
A load runs on the loader's own threads and streams whatever the ``KVTierConfig.load_mode``: the
worker either reports it once ``take_finished`` has it (``async``) or waits for ``submit``'s future
inside the step (``sync``). Either way a load is put into ``take_finished`` only after every copy
it launched has completed (streams synchronized, chunk threads joined, on error paths too), so
vLLM may free or recompute its blocks at once, e.g. when the request was aborted meanwhile.

Each load times its phases with ``perf_counter`` (``directory.LOAD_PHASES``: waiting for a loader
thread, the directory's ``locate``, the one ``ray.get`` of all chunks, the copies up to their final
sync) and reports them twice: as ``kv_tier_load_phase_ms`` (one histogram, tagged by phase, beside
``kv_tier_load_latency_ms``) and in its ``directory.LoadRecord`` (``note_load``, for benchmarks).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np
import ray
import torch

from deployments.kv_tier.directory import LOAD_PHASES, ChunkLocation, LoadRecord
from deployments.kv_tier.host_memory import HostRegistrar, plasma_ranges
from deployments.kv_tier.pages import KVPages, make_slots, scatter_many, scatter_runs
from deployments.kv_tier.shared import LOST_ERRORS, inc, observe

logger = logging.getLogger(__name__)

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

_STAGED, _DIRECT = 1, 2  # how a chunk reached the GPU (Loader._load_chunk)


class Loader:
    """Loads chunks from the object store into allocated blocks, several chunks in parallel."""

    def __init__(self, pages: KVPages, directory, chunk_blocks: int, threads: int,
                 timeout_s: float, tags: dict[str, str], *, host_dma: str, parallel_loads: int) -> None:
        self.pages, self.directory, self.timeout_s, self.tags = pages, directory, timeout_s, tags
        self.host_dma = host_dma if pages.cuda else "staged"
        self._registrar = HostRegistrar(self.host_dma != "staged") if pages.cuda else None
        self._mapping_lock = threading.Lock()
        self._mapping_at = float("-inf")
        self._mapping_thread: threading.Thread | None = None
        if self.host_dma == "mapping" and self._registrar.enabled:
            self._register_mapping()
        self._slots = make_slots(pages, threads, chunk_blocks * pages.block_bytes()) if pages.cuda else None
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kv-tier-load")
        self._coord = ThreadPoolExecutor(max_workers=parallel_loads, thread_name_prefix="kv-tier-locate")
        self._done: queue.Queue = queue.Queue()
        self._local = threading.local()  # each coordinator thread's stream for direct loads

    def close(self) -> None:
        """End the loader's threads (after the loads they run) and unlock what its registrar page-locked.
        An engine's loader lives as long as its process; benchmarks that build several call this."""
        self._coord.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        if self._registrar is not None:
            self._registrar.release_ranges()

    def _register_mapping(self) -> None:
        """Page-lock the object store's mappings in this process, in the background (loads that come
        first, or chunks outside them, go through the pinned slots). Rate-limited: called again when
        a chunk lies outside every registered range (the store mapped a new region)."""
        now = time.monotonic()
        if now - self._mapping_at < 30.0 or not self._mapping_lock.acquire(blocking=False):
            return
        self._mapping_at = now

        def run() -> None:
            try:
                t0 = time.perf_counter()
                ranges = plasma_ranges()
                if not ranges:  # nothing of the store is mapped in this process yet: map it
                    ray.put(np.zeros(1 << 21, dtype=np.uint8))  # > the inline limit: lands in plasma
                    ranges = plasma_ranges()
                torch.cuda.set_device(self.pages.device)
                torch.cuda.current_stream().synchronize()  # a runtime call: the context is current here
                added = self._registrar.register_ranges(ranges)
                seconds = time.perf_counter() - t0
                logger.info("kv tier: page-locked %.1f GiB of the object store (%d ranges) in %.1f s",
                            added / 1024**3, len(ranges), seconds)
                self.directory.note_host_dma.remote(f"{socket.gethostname()}:{os.getpid()}", added, seconds)
            except Exception as err:  # noqa: BLE001 - loads stay on the pinned-slot path
                logger.warning("kv tier: could not page-lock the object store: %s", err)
            finally:
                self._mapping_lock.release()

        self._mapping_thread = threading.Thread(target=run, name="kv-tier-host-dma", daemon=True)
        self._mapping_thread.start()

    def wait_registered(self, timeout_s: float) -> bool:
        """Wait for the background page-locking of the object store (if one runs); False on timeout."""
        thread = self._mapping_thread
        if thread is not None:
            thread.join(timeout_s)
            return not thread.is_alive()
        return True

    def submit(self, req_id: str, block_ids: list[int], keys: list[bytes]) -> Future:
        """Start loading; the result shows up in ``take_finished`` (the future is done by then)."""
        return self._coord.submit(self._load, req_id, block_ids, keys, time.perf_counter())

    def take_finished(self) -> tuple[set[str], set[int]]:
        """Requests whose load ended (successfully or not) and the block ids that failed."""
        reqs, bad = set(), set()
        while True:
            try:
                req_id, failed = self._done.get_nowait()
            except queue.Empty:
                return reqs, bad
            reqs.add(req_id)
            bad |= failed

    def _load(self, req_id: str, block_ids: list[int], keys: list[bytes], t0: float) -> None:
        failed: set[int] = set()
        nbytes = direct = into_pages = 0
        futs: list[Future | None] = []
        marks = [t0, time.perf_counter()]  # submit, start, then the end of each phase reached
        try:
            located: list[ChunkLocation] = ray.get(self.directory.locate.remote(keys), timeout=self.timeout_s)
            marks.append(time.perf_counter())
            failed.update(block_ids[sum(len(c.pos) for c in located):])  # past the first absent key
            entries = [(c, list(c.src), [block_ids[i] for i in c.pos]) for c in located]
            arrs: list = [None] * len(entries)
            try:  # one ray.get for every chunk: one wait (and one GIL hand-back) instead of one per chunk
                arrs = ray.get([loc.ref for loc, _, _ in entries], timeout=self.timeout_s)
            except LOST_ERRORS:
                pass  # the per-chunk path finds which one is gone
            marks.append(time.perf_counter())
            done = self._load_direct(entries, arrs) if self.host_dma == "mapping" else [False] * len(entries)
            futs = [None if d else self._pool.submit(self._load_chunk, *entry, arr)
                    for d, entry, arr in zip(done, entries, arrs)]
            for d, fut, (_, _, dst) in zip(done, futs, entries):
                how = _DIRECT if d else fut.result()
                if how:
                    nbytes += len(dst) * self.pages.block_bytes()
                    direct += how == _DIRECT
                    into_pages += d
                else:
                    failed.update(dst)
        except Exception as err:  # noqa: BLE001 - any load failure is a miss: recompute
            logger.warning("kv tier: load of %s failed, recomputing: %s", req_id, err)
            failed = set(block_ids)
            # Reporting frees or rewrites the blocks: no chunk copy of this load may still run.
            wait([f for f in futs if f is not None])
        marks.append(time.perf_counter())  # the phase that was running ends here (copy, or where it failed)
        ms = (marks[-1] - t0) * 1e3
        phases = {p: (b - a) * 1e3 for p, a, b in zip(LOAD_PHASES, marks, marks[1:])}
        observe("kv_tier_load_latency_ms", ms, self.tags)
        for phase, phase_ms in phases.items():
            observe("kv_tier_load_phase_ms", phase_ms, {**self.tags, "phase": phase})
        if failed:
            inc("kv_tier_load_failed_blocks", len(failed), self.tags)
        try:
            self.directory.note_load.remote(LoadRecord(
                nbytes, ms, len(failed), direct, into_pages, **{f"{p}_ms": v for p, v in phases.items()}))
        finally:  # the request waits in WAITING_FOR_REMOTE_KVS until this is reported
            self._done.put((req_id, failed))

    def _load_direct(self, entries: list, arrs: list) -> list[bool]:
        """H2D every chunk that lies in the page-locked object store and lands in a few runs of
        blocks straight into the pages, from this thread on its own stream, with one
        ``pages.scatter_many`` call for all of them, then wait once. Returns which entries were
        loaded (the others go through ``_load_chunk``).

        Why in this thread and in one call: the engine's thread runs Python through most of every
        step, so every return from a torch or blocking call waits up to the interpreter's switch
        interval for the GIL; one launch and one wait keep those hand-backs to two per load."""
        p = self.pages
        done = [False] * len(entries)
        if not p.cuda or not self._registrar.enabled:
            return done
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(device=p.device)
        with torch.inference_mode(), torch.cuda.device(p.device), torch.cuda.stream(stream):
            try:
                held = [i for i, arr in enumerate(arrs)
                        if arr is not None and self._registrar.covers(arr.ctypes.data, arr.nbytes)]
                copied = scatter_many(p.layers, [(torch.from_numpy(arrs[i]), *entries[i][1:]) for i in held],
                                      non_blocking=True)
                for i, ok in zip(held, copied):
                    done[i] = ok
            finally:  # also on an error: the plasma views (arrs) and the pages outlive every copy
                stream.synchronize()
        return done

    def _load_chunk(self, loc: ChunkLocation, src: list[int], dst: list[int], arr=None) -> int:
        """0: lost (recompute), ``_STAGED``: copied via a pinned slot (or CPU), ``_DIRECT``: DMA'd
        from registered plasma. ``arr``: the chunk, if the caller already has it."""
        try:
            if arr is None:
                arr = ray.get(loc.ref, timeout=self.timeout_s)
        except LOST_ERRORS as err:
            logger.info("kv tier: chunk lost (%s), recomputing", type(err).__name__)
            if isinstance(err, ray.exceptions.OwnerDiedError):
                self.directory.drop_owner.remote(loc.owner)
            else:
                self.directory.drop_chunk.remote(loc.chunk_id)
            return 0
        p = self.pages
        src_t = torch.from_numpy(arr)  # (layers, n, page) read-only view of plasma
        whole = src == list(range(arr.shape[1]))
        with torch.inference_mode():
            if not p.cuda:
                dst_ids = torch.tensor(dst, dtype=torch.long)
                sel = None if whole else torch.tensor(src, dtype=torch.long)
                for l, layer in enumerate(p.layers):
                    layer.index_copy_(0, dst_ids, src_t[l] if sel is None else src_t[l].index_select(0, sel))
                return _STAGED
            slot = self._slots.get()
            flat = src_t.reshape(-1)
            nbytes = arr.nbytes
            reg, held = None, False
            try:
                with torch.cuda.device(p.device), torch.cuda.stream(slot.stream):
                    # a runtime call first: it makes the device's context current in this thread
                    dst_ids = torch.tensor(dst, dtype=torch.long).to(p.device, non_blocking=True)
                    held = self._registrar.covers(flat.data_ptr(), nbytes)
                    if not held and self.host_dma == "per_chunk":
                        reg = self._registrar.register(flat.data_ptr(), nbytes)
                    elif not held and self.host_dma == "mapping":
                        self._register_mapping()  # a region mapped after start: pick it up
                    if held:  # inside the registered object store: one DMA, nothing to undo
                        slot.dev[:nbytes].copy_(flat, non_blocking=True)
                    elif reg is not None:  # DMA straight from plasma; head/tail (<1 page) pageable
                        lo, hi = reg
                        if lo:
                            slot.dev[:lo].copy_(flat[:lo], non_blocking=True)
                        slot.dev[lo:hi].copy_(flat[lo:hi], non_blocking=True)
                        if hi < nbytes:
                            slot.dev[hi:nbytes].copy_(flat[hi:], non_blocking=True)
                    else:
                        slot.host[:nbytes].copy_(flat)
                        slot.dev[:nbytes].copy_(slot.host[:nbytes], non_blocking=True)
                    dev = slot.dev[:nbytes].view(arr.shape)
                    if not scatter_runs(p.layers, dev, src, dst):
                        sel = None if whole else torch.tensor(src, dtype=torch.long, device=p.device)
                        for l, layer in enumerate(p.layers):
                            layer.index_copy_(0, dst_ids, dev[l] if sel is None else dev[l].index_select(0, sel))
                    slot.event.record(slot.stream)
                slot.event.synchronize()
            finally:
                slot.stream.synchronize()  # also on an error path: no copy may still use slot/plasma
                if reg is not None:
                    self._registrar.unregister(flat.data_ptr(), reg[0])
                self._slots.put(slot)
        return _DIRECT if held or reg is not None else _STAGED
