"""The KV tier's directory: block key -> (chunk, index), with a byte budget and LRU eviction.

Owns: ``BlockDirectory`` and ``ChunkLocation``, and the workers' load reports it keeps for benchmarks
(``LoadRecord``, ``LoadLog``). Pure Python (no ray, torch or vllm imports); the Ray actor in
``directory_actor.py`` is a thin subclass, so eviction order is unit-testable.

Data model. Engines store KV in *chunks*: one object-store object holding up to
``chunk_blocks`` consecutive blocks of one request (big objects: ``ray.put`` costs ~0.4 ms per
object, so per-block objects would cap bandwidth). The directory maps each block key to the chunk
that holds it and the block's index in it::

    key(b0) ─┐
    key(b1) ─┼─> Chunk 7 {ref, nbytes, owner, live keys}   <- LRU order is per chunk
    key(b2) ─┘
    key(b3) ───> Chunk 9 {...}

Budget. Memory is freed per object, so bytes and LRU are accounted per chunk: a chunk is charged
in full while any of its blocks is live, a lookup hit touches the chunk, and eviction drops whole
chunks (and with them the directory's reference, which frees the object once no load holds it).

Invariants:
  * ``bytes_used <= budget_bytes`` after every call;
  * a key maps to at most one chunk (the first stored wins; duplicates are not charged);
  * a chunk with no live key is dropped immediately.

Owners. An object dies with the process that ``ray.put`` it. ``drop_owner`` forgets every chunk
of a dead owner so later lookups miss instead of failing loads one by one.

Epoch. A directory that restarts starts empty, so what engines announced to the routers about the
old one is void. ``epoch`` names this incarnation (the actor passes its start time in ms, so a
restarted directory has a larger one); engines learn it from ``poll_evicted`` and put it in their
OBJ events, and routers drop OBJ entries of older epochs (``routers.precise_index``).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class _Chunk:
    ref: Any
    nbytes: int
    owner: str
    keys: set[bytes] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    """Where some of a request's blocks live: one chunk's object ref, the blocks' indices inside
    that chunk (``src``) and their positions in the key list that was located (``pos``).

    ``locate`` answers with one of these per chunk rather than one record per block: every object
    ref in an actor's reply is registered with Ray's reference counting on the way, so a reply of
    one ref per block (512 for 8K tokens, all naming the same 32 chunks) costs several times one per
    chunk (``benchmarks/kv_tier_locate_micro.py``; docs/kv_tier.md, the locate phase)."""

    ref: Any
    chunk_id: int
    owner: str
    src: tuple[int, ...]
    pos: tuple[int, ...]


#: Where a load's time goes (``load.Loader._load``): waiting for a loader thread, the directory's
#: ``locate``, the one ``ray.get`` of every chunk, the H2D copies and scatters up to their final sync
#: (with the chunk threads' own ``ray.get`` of a chunk the batched get lost). A failed load's time ends
#: in the phase that failed; the phases it never reached stay 0.
LOAD_PHASES = ("queue", "locate", "get", "copy")


@dataclass(frozen=True, slots=True)
class LoadRecord:
    """One finished load as its worker reports it: size, outcome, total and per-phase milliseconds."""

    nbytes: int
    ms: float
    failed_blocks: int = 0
    direct_chunks: int = 0  # chunks DMA'd straight from page-locked object-store memory
    into_pages: int = 0  # ... of them copied straight into the paged cache (no device staging slot)
    queue_ms: float = 0.0
    locate_ms: float = 0.0
    get_ms: float = 0.0
    copy_ms: float = 0.0

    def phases_ms(self) -> dict[str, float]:
        """``LOAD_PHASES`` -> milliseconds."""
        return {p: getattr(self, f"{p}_ms") for p in LOAD_PHASES}

    def as_dict(self) -> dict:
        return asdict(self)


class LoadLog:
    """The last ``keep`` load records plus running totals over every load (bounded memory)."""

    def __init__(self, keep: int = 256) -> None:
        if keep <= 0:
            raise ValueError(f"keep must be > 0, got {keep}")
        self._recent: deque[LoadRecord] = deque(maxlen=keep)
        self.loads = self.nbytes = self.failed_blocks = 0
        self._ms = dict.fromkeys(("total", *LOAD_PHASES), 0.0)

    def add(self, rec: LoadRecord) -> None:
        self._recent.append(rec)
        self.loads += 1
        self.nbytes += rec.nbytes
        self.failed_blocks += rec.failed_blocks
        self._ms["total"] += rec.ms
        for phase, ms in rec.phases_ms().items():
            self._ms[phase] += ms

    def recent(self) -> list[LoadRecord]:
        """The kept records, oldest first."""
        return list(self._recent)

    def summary(self) -> dict:
        """Counts over every load, and per phase (``total`` = the whole load) the milliseconds summed and
        their mean per load."""
        n = self.loads
        return {"loads": n, "bytes": self.nbytes, "failed_blocks": self.failed_blocks,
                "ms_total": {k: round(v, 3) for k, v in self._ms.items()},
                "ms_mean": {k: round(v / n, 3) if n else None for k, v in self._ms.items()}}


class BlockDirectory:
    """Cluster-wide map of KV block keys to stored chunks, bounded by a byte budget (LRU)."""

    def __init__(self, budget_bytes: int, max_evicted_feed: int = 65536, epoch: int = 0) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.epoch = int(epoch)
        self._chunks: OrderedDict[int, _Chunk] = OrderedDict()  # LRU first
        self._blocks: dict[bytes, tuple[int, int]] = {}  # key -> (chunk_id, index)
        self._next_id = 0
        self._max_feed = max_evicted_feed
        self._evicted_feed: dict[str, list[bytes]] = {}
        self.bytes_used = 0
        self.counters = {"chunks_stored": 0, "blocks_stored": 0, "chunks_rejected": 0, "chunks_evicted": 0,
                         "blocks_evicted": 0, "blocks_lost": 0, "bytes_stored": 0}

    # --- writes -------------------------------------------------------------------------------
    def add_chunk(self, owner: str, keys: list[bytes], ref: Any, nbytes: int) -> bool:
        """Register a stored chunk whose i-th block has key ``keys[i]``.

        Evicts least-recently-used chunks until it fits. Returns False (and keeps nothing) when
        the chunk is larger than the budget or holds only keys that are already present.
        """
        new = [(i, k) for i, k in enumerate(keys) if k not in self._blocks]
        if not new or nbytes > self.budget_bytes:
            self.counters["chunks_rejected"] += 1
            return False
        while self.bytes_used + nbytes > self.budget_bytes:
            self._evict_lru()
        cid = self._next_id
        self._next_id += 1
        self._chunks[cid] = _Chunk(ref=ref, nbytes=int(nbytes), owner=owner, keys={k for _, k in new})
        for i, k in new:
            self._blocks[k] = (cid, i)
        self.bytes_used += int(nbytes)
        self.counters["chunks_stored"] += 1
        self.counters["blocks_stored"] += len(new)
        self.counters["bytes_stored"] += int(nbytes)
        return True

    def drop_keys(self, keys: list[bytes]) -> int:
        """Forget these blocks (their object was lost). Returns how many were known."""
        n = 0
        for k in keys:
            loc = self._blocks.pop(k, None)
            if loc is None:
                continue
            n += 1
            chunk = self._chunks[loc[0]]
            chunk.keys.discard(k)
            if not chunk.keys:
                self._remove(loc[0])
        self.counters["blocks_lost"] += n
        return n

    def drop_chunk(self, chunk_id: int) -> int:
        """Forget one chunk (its object was lost). Returns blocks dropped."""
        chunk = self._chunks.get(chunk_id)
        if chunk is None:
            return 0
        return self.drop_keys(list(chunk.keys))

    def drop_owner(self, owner: str) -> int:
        """Forget every chunk stored by ``owner`` (that process died). Returns blocks dropped."""
        dead = [cid for cid, c in self._chunks.items() if c.owner == owner]
        n = 0
        for cid in dead:
            n += len(self._chunks[cid].keys)
            for k in self._chunks[cid].keys:
                del self._blocks[k]
            self._remove(cid)
        self.counters["blocks_lost"] += n
        return n

    def clear(self) -> None:
        """Forget everything."""
        for cid in list(self._chunks):
            self._remove(cid)
        self._blocks.clear()

    # --- reads --------------------------------------------------------------------------------
    def lookup(self, keys: list[bytes]) -> list[bool]:
        """Presence of each key; touches (LRU) the chunks of present keys."""
        out = []
        for k in keys:
            loc = self._blocks.get(k)
            out.append(loc is not None)
            if loc is not None:
                self._chunks.move_to_end(loc[0])
        return out

    def locate(self, keys: list[bytes]) -> list[ChunkLocation]:
        """The chunks holding the leading run of present keys (a load stops at the first absent
        key: vLLM computes everything after it), in order of first use; touches them."""
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for i, k in enumerate(keys):
            loc = self._blocks.get(k)
            if loc is None:
                break
            src, pos = groups.setdefault(loc[0], ([], []))
            src.append(loc[1])
            pos.append(i)
        out = []
        for cid, (src, pos) in groups.items():
            self._chunks.move_to_end(cid)
            chunk = self._chunks[cid]
            out.append(ChunkLocation(chunk.ref, cid, chunk.owner, tuple(src), tuple(pos)))
        return out

    def take_evicted(self, owner: str) -> list[bytes]:
        """Keys evicted from chunks ``owner`` stored since the last call (for BlockRemoved events)."""
        return self._evicted_feed.pop(owner, [])

    def poll_evicted(self, owner: str) -> tuple[int, list[bytes]]:
        """``(epoch, take_evicted(owner))``: an engine's periodic poll, which also tells it this directory's epoch."""
        return self.epoch, self.take_evicted(owner)

    def stats(self) -> dict[str, int]:
        """Sizes and cumulative counters."""
        return {"epoch": self.epoch, "bytes_used": self.bytes_used, "budget_bytes": self.budget_bytes,
                "chunks": len(self._chunks), "blocks": len(self._blocks), **self.counters}

    def lru_chunk_ids(self) -> list[int]:
        """Chunk ids, least recently used first (tests and debugging)."""
        return list(self._chunks)

    # --- internals ----------------------------------------------------------------------------
    def _evict_lru(self) -> None:
        assert self._chunks, "over budget with no chunk to evict"
        cid, chunk = next(iter(self._chunks.items()))
        for k in chunk.keys:
            del self._blocks[k]
        feed = self._evicted_feed.setdefault(chunk.owner, [])
        if len(feed) < self._max_feed:
            feed.extend(chunk.keys)
        self.counters["chunks_evicted"] += 1
        self.counters["blocks_evicted"] += len(chunk.keys)
        self._remove(cid)

    def _remove(self, cid: int) -> None:
        chunk = self._chunks.pop(cid)
        self.bytes_used -= chunk.nbytes
        chunk.ref = None
