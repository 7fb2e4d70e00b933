"""Precise prefix index: what each replica's engine really holds, fed by vLLM KV events.

Owns: ``PreciseIndex`` and ``TierMatch``.

Layout::

    gpu:  block hash -> replica mask  blocks in a replica's GPU prefix cache (free to reuse)
    host: block hash -> replica mask  blocks in a replica's own lower tier (CPU offload, local disk)
    obj:  block hash -> reporter mask blocks in the shared object-store tier (medium "OBJ"): any
                                      replica can load them, so they count for every candidate
    owned[r]: block hash -> media bits   per-replica view, for clears and bounded memory

A match walks the chain twice: the GPU-only prefix (vLLM's local hit), then the prefix available
in any tier; the blocks between the two are loads (charged by the policy at a fraction of
recompute). BlockStored/BlockRemoved set/clear one medium bit; AllBlocksCleared (``reset_prefix_cache``)
drops a replica's GPU and host entries but keeps OBJ entries (the object store outlives a cache
reset). ``remove_replica`` drops everything the replica reported, OBJ included (its objects die
with their owner).

OBJ epochs. The tier's directory restarts empty (the references it held die with it) and every
event its engines send names the directory incarnation it came from (``BlockStored.epoch``, increasing).
The index keeps the newest epoch seen: an OBJ event of a newer one drops every replica's OBJ
entries first (what an older directory held is gone; GPU and host entries stay), one of an older
epoch is ignored (a late or replayed event about a directory that no longer exists), and one
without an epoch is taken as current. So after a restart the index stops costing the old blocks as
loads at the first event from the new directory (the first store after the restart), not when
the old entries age out.

Memory: at most ``max_blocks_per_replica`` entries per replica (oldest stored first out, in
batches of 1/64 of the cap so that skipping a dict's deleted slots is paid once per batch, not per
block; events normally keep it at the engine's real size).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice
from typing import NamedTuple

from routers.approx_index import Slots, longest_prefix
from routers.events import OBJ_MEDIUM, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

GPU, HOST, OBJ = 1, 2, 4
_GPU_MEDIA = {"GPU", None}
_OBJ_MEDIA = {OBJ_MEDIUM}


def medium_bit(medium: str | None) -> int:
    """Media bit of an event's ``medium`` (unknown local media count as the host tier)."""
    if medium in _GPU_MEDIA:
        return GPU
    if medium in _OBJ_MEDIA:
        return OBJ
    return HOST


class TierMatch(NamedTuple):
    """Leading prompt blocks a replica can reuse, by where they are."""

    gpu: int
    host: int
    obj: int

    @property
    def blocks(self) -> int:
        return self.gpu + self.host + self.obj


class PreciseIndex:
    """Block hash -> replicas per medium, maintained from KV events."""

    def __init__(self, *, max_blocks_per_replica: int = 1 << 22) -> None:
        self._max = max_blocks_per_replica
        self._slots = Slots()
        self._tier: dict[int, dict[int, int]] = {GPU: {}, HOST: {}, OBJ: {}}
        self._owned: dict[str, dict[int, int]] = {}
        self._live: set[str] = set()
        self._obj_epoch: int | None = None

    # --- updates ---------------------------------------------------------------------------
    def on_event(self, replica_id: str, event: KVEvent) -> None:
        """Apply one event reported by ``replica_id``'s engine (in stream order)."""
        self._live.add(replica_id)
        if isinstance(event, (BlockStored, BlockRemoved)):
            bit = medium_bit(event.medium)
            if bit == OBJ and not self._current_obj_epoch(event.epoch):
                return
            if isinstance(event, BlockStored):
                self._store(replica_id, event.block_hashes, bit)
            else:
                self._remove(replica_id, event.block_hashes, bit)
        elif isinstance(event, AllBlocksCleared):
            self._clear(replica_id, GPU | HOST)

    def mark_live(self, replica_id: str) -> None:
        """``replica_id``'s event stream is connected (even if it has sent nothing yet)."""
        self._live.add(replica_id)

    def reset_replica(self, replica_id: str) -> None:
        """Forget ``replica_id``'s entries (its stream had an unrecoverable gap); stays live."""
        self._clear(replica_id, GPU | HOST | OBJ)

    def remove_replica(self, replica_id: str) -> None:
        """Forget ``replica_id`` entirely (it left the deployment or died)."""
        self._clear(replica_id, GPU | HOST | OBJ)
        self._owned.pop(replica_id, None)
        self._live.discard(replica_id)
        self._slots.release(replica_id)

    # --- queries ---------------------------------------------------------------------------
    @property
    def obj_epoch(self) -> int | None:
        """The newest directory epoch an OBJ event named (None: none named one yet)."""
        return self._obj_epoch

    def is_live(self, replica_id: str) -> bool:
        return replica_id in self._live

    def match(self, block_hashes: Sequence[int], candidates: Iterable[str]) -> dict[str, TierMatch]:
        """Reusable leading blocks per candidate (absent = nothing reusable)."""
        slots = self._slots
        candidates = list(candidates)
        cands = slots.mask(candidates)
        gpu = self._tier[GPU]
        gpu_len = longest_prefix(block_hashes, gpu.get, cands, slots)
        host, obj = self._tier[HOST], self._tier[OBJ]
        if not host and not obj:
            return {r: TierMatch(n, 0, 0) for r, n in gpu_len.items()}
        everyone = 0
        for c in candidates:  # OBJ blocks count for every candidate, even one that never reported
            everyone |= slots.bit(c)

        def any_tier(h: int, _default: int) -> int:
            return everyone if h in obj else gpu.get(h, 0) | host.get(h, 0)

        any_len = longest_prefix(block_hashes, any_tier, everyone, slots)
        out: dict[str, TierMatch] = {}
        for r, n in any_len.items():
            g = gpu_len.get(r, 0)
            bit = slots.bit(r)
            n_host = sum(1 for h in block_hashes[g:n] if host.get(h, 0) & bit)
            out[r] = TierMatch(g, n_host, n - g - n_host)
        return out

    def size(self, replica_id: str | None = None) -> int:
        """Entries reported by one replica, or by all."""
        if replica_id is not None:
            return len(self._owned.get(replica_id, ()))
        return sum(len(o) for o in self._owned.values())

    def holds(self, replica_id: str, block_hash: int, bit: int = GPU) -> bool:
        return bool(self._owned.get(replica_id, {}).get(block_hash, 0) & bit)

    # --- internals -------------------------------------------------------------------------
    def _current_obj_epoch(self, epoch: int | None) -> bool:
        """Whether an OBJ event of ``epoch`` applies; a newer epoch first drops every OBJ entry."""
        if epoch is None or epoch == self._obj_epoch:
            return True
        if self._obj_epoch is not None and epoch < self._obj_epoch:
            return False
        if self._obj_epoch is not None:
            for replica_id in list(self._owned):
                self._clear(replica_id, OBJ)
        self._obj_epoch = epoch
        return True

    def _store(self, replica_id: str, hashes: Iterable[int], bit: int) -> None:
        owned = self._owned.setdefault(replica_id, {})
        tier, me = self._tier[bit], self._slots.bit(replica_id)
        for h in hashes:
            bits = owned.get(h, 0)
            if not bits & bit:
                owned[h] = bits | bit
                tier[h] = tier.get(h, 0) | me
        if len(owned) > self._max:
            # a plain dict: next(iter()) after front deletions rescans them, so one scan per batch
            batch = len(owned) - self._max + self._max // 64
            for old in list(islice(owned, batch)):
                self._drop(replica_id, owned, old, owned[old])

    def _remove(self, replica_id: str, hashes: Iterable[int], bit: int) -> None:
        owned = self._owned.get(replica_id)
        if owned is None:
            return
        for h in hashes:
            bits = owned.get(h, 0)
            if bits & bit:
                self._drop(replica_id, owned, h, bit)

    def _clear(self, replica_id: str, mask: int) -> None:
        owned = self._owned.get(replica_id)
        if not owned:
            return
        for h, bits in list(owned.items()):
            if bits & mask:
                self._drop(replica_id, owned, h, bits & mask)

    def _drop(self, replica_id: str, owned: dict[int, int], h: int, bits: int) -> None:
        me = self._slots.bit(replica_id)
        for bit in (GPU, HOST, OBJ):
            if bits & bit:
                tier = self._tier[bit]
                m = tier.get(h, 0) & ~me
                if m:
                    tier[h] = m
                else:
                    tier.pop(h, None)
        left = owned.get(h, 0) & ~bits
        if left:
            owned[h] = left
        else:
            owned.pop(h, None)
