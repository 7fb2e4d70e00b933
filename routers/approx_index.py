"""Approximate prefix index: which replica probably holds which prompt blocks, learned from routing.

Owns: ``ApproxIndex`` and ``longest_prefix`` (the prefix walk shared with the precise index).

Algorithm (llm-d's approximate prefix-cache producer, on vLLM's own block hashes)::

    holders:  block hash -> bit mask of replicas     reverse map, answers "who has h?"
    lru[r]:   OrderedDict(block hash -> last routed)  one LRU per replica, oldest first

    on_routed(r, h[0..n)):  touch h[n-1] .. h[0] in r's LRU (leaves first, so the root is the most
                            recent and a prefix's tail is evicted before its head, as in vLLM's
                            free queue), then evict the oldest until len(lru[r]) <= capacity[r].
    match(h[0..n)):         walk the chain; a replica's match ends at the first block it lacks.

Knobs: ``capacity_factor`` (index entries per KV block the replica reports; 1.0 mirrors the
engine's KV capacity) and ``default_capacity_blocks`` (used until the replica reports its size).
Memory is bounded: at most sum(capacity[r]) entries, about 150 bytes each. The index is a guess:
it does not see engine evictions caused by other routers or by decode growth; the precise index
(``precise_index.py``) corrects that when KV events are on.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence


class Slots:
    """Replica id <-> bit position, so holder sets are ints (fast ``&``, invisible to the GC)."""

    __slots__ = ("_bit", "_free", "_ids")

    def __init__(self) -> None:
        self._bit: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free: list[int] = []

    def bit(self, replica_id: str) -> int:
        b = self._bit.get(replica_id)
        if b is None:
            b = self._free.pop() if self._free else len(self._ids)
            if b == len(self._ids):
                self._ids.append(replica_id)
            else:
                self._ids[b] = replica_id
            self._bit[replica_id] = b
        return 1 << b

    def release(self, replica_id: str) -> None:
        b = self._bit.pop(replica_id, None)
        if b is not None:
            self._ids[b] = None
            self._free.append(b)

    def mask(self, replica_ids: Iterable[str]) -> int:
        m = 0
        for r in replica_ids:
            b = self._bit.get(r)
            if b is not None:
                m |= 1 << b
        return m

    def ids(self, mask: int) -> Iterator[str]:
        while mask:
            low = mask & -mask
            rid = self._ids[low.bit_length() - 1]
            if rid is not None:
                yield rid
            mask ^= low


def longest_prefix(block_hashes: Sequence[int], holders_of: Callable[[int, int], int], candidates: int,
                   slots: Slots) -> dict[str, int]:
    """Leading blocks of ``block_hashes`` held by each candidate (only candidates with >= 1 block).

    ``holders_of(h, 0)`` returns the bit mask of replicas holding block ``h``; ``candidates`` is a mask.
    """
    alive = candidates
    matched: dict[str, int] = {}
    n = 0
    for h in block_hashes:
        still = holders_of(h, 0) & alive
        if still != alive:
            if n:
                for r in slots.ids(alive & ~still):
                    matched[r] = n
            alive = still
            if not alive:
                return matched
        n += 1
    if n:
        for r in slots.ids(alive):
            matched[r] = n
    return matched


class ApproxIndex:
    """Block hash -> replicas, learned from routing decisions, bounded per replica by an LRU."""

    def __init__(self, *, capacity_factor: float = 1.0, default_capacity_blocks: int = 8192) -> None:
        if capacity_factor <= 0 or default_capacity_blocks <= 0:
            raise ValueError("capacity_factor and default_capacity_blocks must be positive")
        self._factor = capacity_factor
        self._default_capacity = default_capacity_blocks
        self._slots = Slots()
        self._holders: dict[int, int] = {}
        self._lru: dict[str, OrderedDict[int, float]] = {}
        self._capacity: dict[str, int] = {}

    # --- updates ---------------------------------------------------------------------------
    def set_capacity(self, replica_id: str, kv_capacity_blocks: int) -> None:
        """Size ``replica_id``'s LRU from its KV capacity (blocks); evicts at once if it shrank."""
        cap = int(kv_capacity_blocks * self._factor) if kv_capacity_blocks > 0 else self._default_capacity
        self._capacity[replica_id] = max(cap, 1)
        lru = self._lru.get(replica_id)
        if lru is not None:
            self._evict(replica_id, lru)

    def on_routed(self, replica_id: str, block_hashes: Sequence[int], now: float) -> None:
        """Record that ``replica_id`` will hold ``block_hashes`` (a request was routed there)."""
        if not block_hashes:
            return
        lru = self._lru.get(replica_id)
        if lru is None:
            lru = self._lru[replica_id] = OrderedDict()
            self._capacity.setdefault(replica_id, self._default_capacity)
        holders, bit = self._holders, self._slots.bit(replica_id)
        for h in reversed(block_hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                holders[h] = holders.get(h, 0) | bit
            lru[h] = now
        self._evict(replica_id, lru)

    def forget(self, replica_id: str, block_hashes: Iterable[int]) -> None:
        """Drop entries known to be gone (e.g. a precise BlockRemoved for the same replica)."""
        lru = self._lru.get(replica_id)
        if lru is None:
            return
        for h in block_hashes:
            if lru.pop(h, None) is not None:
                self._unhold(h, replica_id)

    def remove_replica(self, replica_id: str) -> None:
        """Forget everything about ``replica_id`` (it left the deployment or died)."""
        lru = self._lru.pop(replica_id, None)
        self._capacity.pop(replica_id, None)
        if lru:
            for h in lru:
                self._unhold(h, replica_id)
        self._slots.release(replica_id)

    def clear_replica(self, replica_id: str) -> None:
        """Empty ``replica_id``'s entries but keep its capacity (its cache was reset)."""
        cap = self._capacity.get(replica_id)
        self.remove_replica(replica_id)
        if cap is not None:
            self._capacity[replica_id] = cap

    # --- queries ---------------------------------------------------------------------------
    def match(self, block_hashes: Sequence[int], candidates: Iterable[str]) -> dict[str, int]:
        """Leading blocks of the prompt each candidate probably holds (absent = 0)."""
        return longest_prefix(block_hashes, self._holders.get, self._slots.mask(candidates), self._slots)

    def last_routed(self, replica_id: str, block_hash: int) -> float | None:
        """When ``block_hash`` was last routed to ``replica_id`` (None if not indexed)."""
        lru = self._lru.get(replica_id)
        return None if lru is None else lru.get(block_hash)

    def size(self, replica_id: str | None = None) -> int:
        """Indexed entries for one replica, or for all."""
        if replica_id is not None:
            return len(self._lru.get(replica_id, ()))
        return sum(len(lru) for lru in self._lru.values())

    def capacity(self, replica_id: str) -> int:
        """The LRU bound of ``replica_id`` (entries)."""
        return self._capacity.get(replica_id, self._default_capacity)

    def replicas(self) -> list[str]:
        """Replicas with an LRU (indexed at least once)."""
        return list(self._lru)

    def lru_order(self, replica_id: str) -> list[int]:
        """``replica_id``'s entries, least recently routed first (for tests and debugging)."""
        return list(self._lru.get(replica_id, ()))

    # --- internals -------------------------------------------------------------------------
    def _evict(self, replica_id: str, lru: OrderedDict[int, float]) -> None:
        cap = self._capacity.get(replica_id, self._default_capacity)
        while len(lru) > cap:
            h, _ = lru.popitem(last=False)
            self._unhold(h, replica_id)

    def _unhold(self, h: int, replica_id: str) -> None:
        m = self._holders.get(h)
        if m is not None:
            m &= ~self._slots.bit(replica_id)
            if m:
                self._holders[h] = m
            else:
                del self._holders[h]
