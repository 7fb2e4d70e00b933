"""Ray and torch I/O of the KV tier: the directory actor, paged-KV gather/scatter, store and load.

Owns: ``ensure_ray``, ``KVPages``, ``Storer``, ``Loader`` (the directory actor is ``directory_actor.py``).
This is the only module of the tier that imports ray and torch at module level.

Object layout. A chunk is one ``ray.put`` numpy ``uint8`` array ``(layers, n_blocks, page_bytes)``
where ``page_bytes`` is one block of one layer exactly as vLLM's paged cache holds it (dim 0 of
every attention backend's cache is the block; the page is contiguous for FlashAttention,
FlashInfer, Triton and CPU). Copies are therefore layout-agnostic byte copies; the key fingerprint
carries the page size so incompatible layouts never meet.

GPU path (designed for the H100 numbers in the notes; the CPU path runs the same code without
streams):
  * store: on a low-priority side stream that waits for the compute stream, ``index_select`` the
    blocks of every layer into a device staging slot, one D2H copy into a pinned host slot, an
    event; a put thread waits for the event, ``ray.put``s the host slot (the only CPU copy) and
    registers the ref with the directory. The request's GPU blocks are held
    (``request_finished`` -> True) only until the D2H copy is done, not until the put.
    The engine thread only launches (``wait_for_save`` -> ``submit`` never waits on an event;
    the block-id upload comes from pinned memory because a pageable H2D may synchronize with the
    side stream, i.e. with the forward it waits for). ``ray.put``'s memcpy into plasma runs
    outside the GIL (Ray's serializer: ``parallel_memcopy``, nogil); what is left in the put
    threads is short Python. How much is stored per step is decided by the scheduler side
    (``plan.admit_stores``), which is what bounds the store path's cost on a busy engine.
  * load: ``load_threads`` threads, one chunk each: ``ray.get`` (a zero-copy view of plasma), one
    H2D copy of the whole chunk into a device slot, then one ``_foreach_copy_`` into every layer's
    pages when the target blocks form a few runs of consecutive ids (``scatter_runs``; else
    ``index_copy_`` per layer), all on the thread's stream. The H2D copy reads plasma directly: the chunk's page-aligned interior is page-locked
    with ``cuMemHostRegister`` (driver API through ctypes, so a failure never leaves a sticky
    runtime error for torch to trip over later) and DMA'd at PCIe speed; the <4 KiB unaligned
    head and tail go through the driver's pageable path. Why: the first H100 run loaded at
    8.3 GB/s through "memcpy into a pinned slot, then H2D" (the notes: 7-9 GB/s per thread; the
    memcpy faults in every plasma page and then copies it on the CPU), while registering plasma
    and DMA'ing it ran at 50-54 GB/s; registering costs ~50 ms/GiB for pages that already exist
    (a stored chunk's pages always do), i.e. ~1.6 ms per 32 MiB chunk, done in the kernel with
    the GIL released, so 8 threads overlap registration of one chunk with DMA of others.
    Registering per chunk (not the whole plasma mapping once) keeps the cost proportional to what
    is loaded, pins nothing between loads, and never pins the object store's unused pages (the
    whole 40 GiB mapping would take ~20 s and pin all of it). The registration is undone after
    the copy's event, before the plasma view is released. If registration fails (a mapping the
    driver refuses, the same chunk being loaded by two requests at once), that chunk falls back
    to the old memcpy-into-pinned-slot path; after repeated failures registration is switched
    off for the process.
  * staging slots are a fixed pool allocated once; stores wait for a slot in a backlog bounded in
    blocks (beyond it a store is dropped and counted), so the tier never stalls the engine, never
    grows memory, and holds back at most ``store_backlog_mib`` of KV blocks.

Ownership. Objects are owned by the engine process that put them (``ray.put(_owner=)`` is gone
in Ray 2.60). A separate owner actor would need a second copy of every chunk through the object
store (engine -> actor -> store) and would still die with its node; the tier is a cache, so when
an engine dies its objects are lost, a load reports ``OwnerDiedError``/``ObjectLostError``, the
blocks are reported as load errors (vLLM's ``kv_load_failure_policy="recompute"`` recomputes
them) and the directory forgets every chunk of that owner.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import queue
import threading
import time
import warnings
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray
import torch

from deployments.kv_tier.directory import Location
from deployments.kv_tier.plan import copy_runs

logger = logging.getLogger(__name__)

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

# Ray errors that mean "the object is gone": a miss, never a failed request.
_LOST_ERRORS = (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError,
                ray.exceptions.ObjectFetchTimedOutError, ray.exceptions.GetTimeoutError,
                ray.exceptions.ObjectReconstructionFailedError)


def ensure_ray(address: str | None, namespace: str) -> None:
    """Connect this process (an engine core or worker: its own Ray driver) to the cluster."""
    if ray.is_initialized():
        return
    ray.init(address=address or "auto", namespace=namespace, log_to_driver=False,
             ignore_reinit_error=True, configure_logging=False)


class KVPages:
    """Byte views of a paged KV cache: one ``(num_blocks, page_bytes)`` uint8 view per layer."""

    def __init__(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.names = sorted(kv_caches)
        self.layers: list[torch.Tensor] = []
        for name in self.names:
            t = kv_caches[name]
            page = 1
            for s in t.shape[1:]:
                page *= s
            if t.stride(0) != page:
                raise ValueError(f"kv tier: layer {name} has no contiguous block pages "
                                 f"(shape {tuple(t.shape)}, strides {t.stride()})")
            flat = t.as_strided((t.shape[0], page), (page, 1))
            self.layers.append(flat.view(torch.uint8))
        self.num_layers = len(self.layers)
        self.page_bytes = self.layers[0].shape[1]
        self.device = self.layers[0].device
        self.cuda = self.device.type == "cuda"

    def block_bytes(self) -> int:
        """Bytes of one block over all layers."""
        return self.num_layers * self.page_bytes


@dataclass(slots=True)
class _Slot:
    host: torch.Tensor  # uint8, pinned on GPU machines
    dev: torch.Tensor | None
    stream: object | None
    event: object | None


def _make_slots(pages: KVPages, count: int, nbytes: int) -> queue.Queue[_Slot]:
    q: queue.Queue[_Slot] = queue.Queue()
    for _ in range(count):
        if pages.cuda:
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            dev = torch.empty(nbytes, dtype=torch.uint8, device=pages.device)
            stream = torch.cuda.Stream(device=pages.device, priority=0)
            q.put(_Slot(host, dev, stream, torch.cuda.Event()))
        else:
            q.put(_Slot(torch.empty(nbytes, dtype=torch.uint8), None, None, None))
    return q


_STAGED, _DIRECT = 1, 2  # how a chunk reached the GPU (Loader._load_chunk)
_PAGE = mmap.PAGESIZE
_MIN_REGISTER_BYTES = 1 << 20  # below this the pinned-slot memcpy is as fast as registering
_CU_MEMHOSTREGISTER_PORTABLE = 0x01
_CU_MEMHOSTREGISTER_READ_ONLY = 0x08


def page_interior(ptr: int, nbytes: int, page: int = _PAGE) -> tuple[int, int]:
    """Offsets ``(lo, hi)`` of the whole pages inside ``[ptr, ptr + nbytes)`` (``lo == hi`` if none).

    Only whole pages are registered: plasma objects are 64-byte aligned, so two chunks can share
    a page, and registering overlapping ranges from two loader threads would fail.
    """
    lo = (-ptr) % page
    hi = ((ptr + nbytes) // page) * page - ptr
    return (lo, hi) if hi > lo else (0, 0)


class HostRegistrar:
    """Page-locks host ranges for direct DMA (``cuMemHostRegister``/``cuMemHostUnregister``).

    Driver API via ctypes (``libcuda.so.1``) rather than ``torch.cuda.cudart()``: a failed
    runtime call leaves the thread's last-error set and torch's next launch check would raise it;
    driver-API errors are only return codes. GIL released during the calls (ctypes).
    """

    MAX_FAILURES = 8

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registered = 0  # chunks DMA'd from registered plasma (for logs/tests)
        self._failures = 0
        if not enabled:
            return
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            self._reg = getattr(lib, "cuMemHostRegister_v2", None) or lib.cuMemHostRegister
            self._reg.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            self._reg.restype = ctypes.c_int
            self._unreg = lib.cuMemHostUnregister
            self._unreg.argtypes = [ctypes.c_void_p]
            self._unreg.restype = ctypes.c_int
            self._ctx = lib.cuCtxGetCurrent
            self._ctx.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
            self._ctx.restype = ctypes.c_int
        except (OSError, AttributeError) as err:
            logger.info("kv tier: no CUDA driver API (%s); loads copy through pinned slots", err)
            self.enabled = False

    def register(self, ptr: int, nbytes: int) -> tuple[int, int] | None:
        """Register the whole pages of ``[ptr, ptr+nbytes)``; returns their offsets, or None."""
        if not self.enabled:
            return None
        lo, hi = page_interior(ptr, nbytes)
        if hi - lo < _MIN_REGISTER_BYTES:
            return None
        ctx = ctypes.c_void_p()
        if self._ctx(ctypes.byref(ctx)) != 0 or not ctx.value:
            return None  # no current context in this thread (the caller makes a runtime call first)
        rc = self._reg(ptr + lo, hi - lo, _CU_MEMHOSTREGISTER_PORTABLE)
        if rc != 0:
            rc2 = self._reg(ptr + lo, hi - lo, _CU_MEMHOSTREGISTER_PORTABLE | _CU_MEMHOSTREGISTER_READ_ONLY)
            if rc2 != 0:
                self._failures += 1
                if self._failures >= self.MAX_FAILURES:
                    self.enabled = False
                    logger.warning("kv tier: cuMemHostRegister keeps failing (CUresult %d/%d); loads copy "
                                   "through pinned slots from now on", rc, rc2)
                return None
        self._failures = 0
        self.registered += 1
        return lo, hi

    def unregister(self, ptr: int, lo: int) -> None:
        rc = self._unreg(ptr + lo)
        if rc != 0:
            logger.warning("kv tier: cuMemHostUnregister failed (CUresult %d)", rc)


class Storer:
    """Copies full prompt blocks out of the paged cache and puts them into the object store.

    ``submit`` (main thread, after the forward) only queues the op with a "computed" event; ops
    are launched onto free staging slots in order (by ``submit`` or by a put thread freeing a
    slot). A request's blocks stay allocated (delayed free) until its copies are off the cache, so
    queued ops read valid data. The backlog is bounded in blocks; beyond it a store is dropped.
    """

    def __init__(self, pages: KVPages, directory, owner: str, chunk_blocks: int, slots: int,
                 put_threads: int, max_backlog_blocks: int, tags: dict[str, str]) -> None:
        self.pages, self.directory, self.owner, self.tags = pages, directory, owner, tags
        self.chunk_blocks = chunk_blocks
        self.max_backlog_blocks = max_backlog_blocks
        self._free = _make_slots(pages, slots, chunk_blocks * pages.block_bytes())
        self._backlog: deque = deque()  # (req_id, block_ids, keys, computed_event)
        self._backlog_blocks = 0
        self._work: queue.Queue = queue.Queue()
        self._lock = threading.RLock()  # _pump -> _copied on a failed launch re-enters
        self._pending: dict[str, int] = defaultdict(int)  # req -> ops not yet copied off the cache
        self._reqs: set[str] = set()  # requests with store ops (reported in finished_sending)
        self._finished: set[str] = set()
        self._inflight: list = []  # (req_id, copy-done event) of launched copies
        self.dropped = 0
        for i in range(put_threads):
            threading.Thread(target=self._run, name=f"kv-tier-store-{i}", daemon=True).start()

    def submit(self, req_id: str, block_ids: list[int], keys: list[bytes]) -> None:
        """Queue a copy of these blocks (called right after the forward pass that computed them)."""
        self._reqs.add(req_id)
        event = None
        if self.pages.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.pages.device))
        with self._lock:
            if self._backlog_blocks + len(block_ids) > self.max_backlog_blocks:
                self.dropped += 1
                inc("kv_tier_dropped_stores", 1, self.tags)
                return
            self._pending[req_id] += 1
            self._backlog.append((req_id, block_ids, keys, event))
            self._backlog_blocks += len(block_ids)
        self._pump()

    def cancel(self, req_ids: set[str]) -> None:
        """Drop queued copies of these requests and wait for their launched ones (preemption)."""
        with self._lock:
            keep = deque()
            for op in self._backlog:
                if op[0] in req_ids:
                    self._backlog_blocks -= len(op[1])
                    self._pending[op[0]] -= 1
                    if not self._pending[op[0]]:
                        del self._pending[op[0]]
                else:
                    keep.append(op)
            self._backlog = keep
            events = [ev for r, ev in self._inflight if r in req_ids and ev is not None]
        for ev in events:
            ev.synchronize()

    def finished(self, finished_req_ids: set[str]) -> set[str]:
        """Finished requests whose blocks are no longer read by a pending copy."""
        self._finished |= finished_req_ids & self._reqs
        with self._lock:
            done = {r for r in self._finished if self._pending.get(r, 0) == 0}
        self._finished -= done
        self._reqs -= done
        return done

    def _pump(self) -> None:
        """Launch backlog ops onto free slots (any thread)."""
        with self._lock:
            while self._backlog:
                try:
                    slot = self._free.get_nowait()
                except queue.Empty:
                    return
                req_id, block_ids, keys, event = self._backlog.popleft()
                self._backlog_blocks -= len(block_ids)
                try:
                    self._launch(slot, block_ids, event)
                except Exception:
                    logger.exception("kv tier: store copy failed")
                    self._free.put(slot)
                    self._copied(req_id)
                    continue
                self._inflight.append((req_id, slot.event))
                self._work.put((req_id, slot, len(block_ids), keys))

    def _launch(self, slot: _Slot, block_ids: list[int], event) -> None:
        p = self.pages
        n = len(block_ids)
        nbytes = n * p.block_bytes()
        with torch.inference_mode():
            if p.cuda:
                dev = slot.dev[:nbytes].view(p.num_layers, n, p.page_bytes)
                with torch.cuda.stream(slot.stream):
                    slot.stream.wait_event(event)
                    # pinned source: a pageable H2D may synchronize with this stream, i.e. stall the
                    # engine's thread until the forward it waits for is done
                    ids = torch.tensor(block_ids, dtype=torch.long).pin_memory().to(p.device, non_blocking=True)
                    for l, layer in enumerate(p.layers):
                        torch.index_select(layer, 0, ids, out=dev[l])
                    slot.host[:nbytes].copy_(slot.dev[:nbytes], non_blocking=True)
                    slot.event.record(slot.stream)
            else:
                ids = torch.tensor(block_ids, dtype=torch.long)
                host = slot.host[:nbytes].view(p.num_layers, n, p.page_bytes)
                for l, layer in enumerate(p.layers):
                    torch.index_select(layer, 0, ids, out=host[l])

    def _copied(self, req_id: str, event=None) -> None:
        with self._lock:
            self._inflight = [x for x in self._inflight if not (x[0] == req_id and x[1] is event)]
            self._pending[req_id] -= 1
            if not self._pending[req_id]:
                del self._pending[req_id]

    def _run(self) -> None:
        p = self.pages
        while True:
            req_id, slot, n, keys = self._work.get()
            nbytes = n * p.block_bytes()
            try:
                if slot.event is not None:
                    slot.event.synchronize()
            finally:
                self._copied(req_id, slot.event)
            try:
                arr = slot.host[:nbytes].numpy().reshape(p.num_layers, n, p.page_bytes)
                ref = ray.put(arr)
                self.directory.add_chunk_ref.remote(self.owner, keys, [ref], nbytes)
                del ref
                inc("kv_tier_stored_bytes", nbytes, self.tags)
            except Exception as err:  # noqa: BLE001 - ObjectStoreFullError etc.: a dropped store
                self.dropped += 1
                inc("kv_tier_dropped_stores", 1, self.tags)
                logger.warning("kv tier: store of %d blocks dropped: %s", n, err)
            finally:
                self._free.put(slot)
            self._pump()


class Loader:
    """Loads chunks from the object store into allocated blocks, several chunks in parallel."""

    def __init__(self, pages: KVPages, directory, chunk_blocks: int, threads: int,
                 timeout_s: float, tags: dict[str, str], register_host_memory: bool = True) -> None:
        self.pages, self.directory, self.timeout_s, self.tags = pages, directory, timeout_s, tags
        self._registrar = HostRegistrar(register_host_memory) if pages.cuda else None
        self._slots = _make_slots(pages, threads, chunk_blocks * pages.block_bytes()) if pages.cuda else None
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kv-tier-load")
        self._coord = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-tier-locate")
        self._done: queue.Queue = queue.Queue()

    def submit(self, req_id: str, block_ids: list[int], keys: list[bytes]) -> None:
        """Start loading; the result shows up in ``take_finished``."""
        self._coord.submit(self._load, req_id, block_ids, keys, time.perf_counter())

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
        nbytes = direct = 0
        try:
            locs: list[Location | None] = ray.get(self.directory.locate.remote(keys), timeout=self.timeout_s)
            chunks: dict[int, tuple[Location, list[int], list[int]]] = {}
            for i, (loc, bid) in enumerate(zip(locs, block_ids)):
                if loc is None:
                    failed.update(block_ids[i:])
                    break
                entry = chunks.setdefault(loc.chunk_id, (loc, [], []))
                entry[1].append(loc.index)
                entry[2].append(bid)
            futs = [self._pool.submit(self._load_chunk, *entry) for entry in chunks.values()]
            for fut, (_, _, dst) in zip(futs, chunks.values()):
                how = fut.result()
                if how:
                    nbytes += len(dst) * self.pages.block_bytes()
                    direct += how == _DIRECT
                else:
                    failed.update(dst)
        except Exception as err:  # noqa: BLE001 - any load failure is a miss: recompute
            logger.warning("kv tier: load of %s failed, recomputing: %s", req_id, err)
            failed = set(block_ids)
        ms = (time.perf_counter() - t0) * 1e3
        observe("kv_tier_load_latency_ms", ms, self.tags)
        if failed:
            inc("kv_tier_load_failed_blocks", len(failed), self.tags)
        try:
            self.directory.note_load.remote(nbytes, ms, len(failed), direct)
        finally:  # the request waits in WAITING_FOR_REMOTE_KVS until this is reported
            self._done.put((req_id, failed))

    def _load_chunk(self, loc: Location, src: list[int], dst: list[int]) -> int:
        """0: lost (recompute), ``_STAGED``: copied via a pinned slot (or CPU), ``_DIRECT``: DMA'd
        from registered plasma."""
        try:
            arr = ray.get(loc.ref, timeout=self.timeout_s)
        except _LOST_ERRORS as err:
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
            reg = None
            try:
                with torch.cuda.device(p.device), torch.cuda.stream(slot.stream):
                    # a runtime call first: it makes the device's context current in this thread
                    dst_ids = torch.tensor(dst, dtype=torch.long).to(p.device, non_blocking=True)
                    reg = self._registrar.register(flat.data_ptr(), nbytes)
                    if reg is not None:  # DMA straight from plasma; head/tail (<1 page) pageable
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
        return _STAGED if reg is None else _DIRECT


_MAX_FOREACH_RUNS = 4


def scatter_runs(layers: list[torch.Tensor], dev: torch.Tensor, src: list[int], dst: list[int]) -> bool:
    """Copy ``dev[l, src[i]] -> layers[l][dst[i]]`` for every layer with ONE ``_foreach_copy_`` call
    when the blocks form at most ``_MAX_FOREACH_RUNS`` runs of consecutive ids (the usual case for
    a fresh allocation); returns False (nothing copied) otherwise.

    Why: a per-layer ``index_copy_`` is 32 Python-level launches per chunk for 8B, each releasing
    and re-taking the GIL in a loader thread while the engine thread spins through empty steps
    (the request waits in WAITING_FOR_REMOTE_KVS); one foreach call is one hand-off and, on CUDA,
    a few multi-tensor kernels.
    """
    foreach = getattr(torch, "_foreach_copy_", None)
    runs = copy_runs(src, dst)
    if foreach is None or len(runs) > _MAX_FOREACH_RUNS:
        return False
    dsts, srcs = [], []
    for l, layer in enumerate(layers):
        for s0, d0, k in runs:
            dsts.append(layer[d0:d0 + k])
            srcs.append(dev[l, s0:s0 + k])
    foreach(dsts, srcs)
    return True


def inc(name: str, value: float, tags: dict[str, str]) -> None:
    try:
        from deployments.metrics import metrics

        getattr(metrics(), name).inc(value, tags=tags)
    except Exception:
        logger.debug("kv tier: metric %s failed", name, exc_info=True)


def observe(name: str, value: float, tags: dict[str, str]) -> None:
    try:
        from deployments.metrics import metrics

        getattr(metrics(), name).observe(value, tags=tags)
    except Exception:
        logger.debug("kv tier: metric %s failed", name, exc_info=True)
