"""Store: copy full prompt blocks out of the paged cache into Ray's object store.

Owns: ``Storer``. Which blocks are stored, and how many per step, is decided by the scheduler
side (``plan.admit_stores``), which is what bounds the store path's cost on a busy engine.

GPU path (designed for the H100 numbers in the notes; the CPU path runs the same code without
streams): on a low-priority side stream that waits for the compute stream, ``index_select`` the
blocks of every layer into a device staging slot (``pages.make_slots``), one D2H copy into a
pinned host slot, an event; a put thread waits for the event, ``ray.put``s the host slot (the
only CPU copy) and registers the ref with the directory. The request's GPU blocks are held
(``request_finished`` -> True) only until the D2H copy is done, not until the put. The engine
thread only launches (``wait_for_save`` -> ``submit`` never waits on an event; the block-id
upload comes from pinned memory because a pageable H2D may synchronize with the side stream,
i.e. with the forward it waits for). ``ray.put``'s memcpy into plasma runs outside the GIL (Ray's
serializer: ``parallel_memcopy``, nogil); what is left in the put threads is short Python.

Stores wait for a free slot in a backlog bounded in blocks (beyond it a store is dropped and
counted), so the tier never stalls the engine and holds back at most ``store_backlog_mib`` of KV
blocks. The objects are owned by this engine process (see ``shared``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict, deque

import ray
import torch

from deployments.kv_tier.pages import KVPages, Slot, make_slots
from deployments.kv_tier.shared import inc

logger = logging.getLogger(__name__)


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
        self._free = make_slots(pages, slots, chunk_blocks * pages.block_bytes())
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

    def _launch(self, slot: Slot, block_ids: list[int], event) -> None:
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
