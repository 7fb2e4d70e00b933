"""vLLM KV-cache events as plain data, and the sequence bookkeeping of one event stream.

Owns: ``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared`` (the three events vLLM's block pool
and KV connectors emit), ``decode_batch`` (msgpack-decoded ``[ts, events, dp_rank]`` -> events) and
``SeqTracker`` (detects gaps so the subscriber can ask the replay socket) and ``coalesce`` (runs of
events that apply as one, merged). No sockets here: the ZMQ
subscriber in ``deployments/kv_events.py`` does the I/O and feeds these to the precise index.

Wire format (``vllm/distributed/kv_events.py``): each ZMQ message is ``(topic, seq: 8-byte big-endian,
payload)``; the payload is msgpack of an array-like ``EventBatch`` ``[ts, [event...], dp_rank]``
where each event is a map tagged ``{"type": "BlockStored" | "BlockRemoved" | "AllBlocksCleared",
...}``. Block hashes are the low 64 bits of vLLM's digests (ints), or raw bytes when the engine runs
with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``; bytes are folded to the same 64-bit ints here.
``medium`` is "GPU", "CPU" (host offload), "STORAGE"/"FS" (local disk) or "OBJ" (our shared
object-store tier); None means GPU. The object-store tier's engines write "OBJ@<epoch>": the epoch
names the incarnation of the tier's directory that holds the blocks (a new one on every directory
start, increasing; ``obj_medium``), decoded into the event's ``epoch`` (None when not given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_LOW64 = (1 << 64) - 1
OBJ_MEDIUM = "OBJ"
_EPOCH_SEP = "@"


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    medium: str = "GPU"
    parent_block_hash: int | None = None
    epoch: int | None = None  # OBJ only: the tier directory's incarnation


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str = "GPU"
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def obj_medium(epoch: int | None) -> str:
    """The ``medium`` of an object-store tier event: "OBJ@<epoch>", or "OBJ" when the epoch is unknown."""
    return OBJ_MEDIUM if epoch is None else f"{OBJ_MEDIUM}{_EPOCH_SEP}{int(epoch)}"


def split_medium(medium: str | None) -> tuple[str, int | None]:
    """A wire ``medium`` -> (medium, epoch): "OBJ@42" -> ("OBJ", 42); None -> ("GPU", None)."""
    if not medium:
        return "GPU", None
    base, sep, epoch = medium.partition(_EPOCH_SEP)
    if sep and base == OBJ_MEDIUM:
        return base, int(epoch) if epoch.isdigit() else None
    return medium, None


def _as_int(h: Any) -> int:
    if isinstance(h, int):
        return h & _LOW64
    if isinstance(h, (bytes, bytearray, memoryview)):
        return int.from_bytes(bytes(h), "big") & _LOW64
    raise ValueError(f"unexpected block hash type {type(h).__name__}")


def _field(raw: Any, name: str, pos: int, default: Any = None) -> Any:
    if isinstance(raw, dict):
        return raw.get(name, default)
    return raw[pos] if len(raw) > pos else default  # array-like struct: [tag, field1, field2, ...]


def decode_event(raw: Any) -> KVEvent | None:
    """One msgpack-decoded event (map or array form) -> a KVEvent; None for unknown kinds."""
    kind = raw.get("type") if isinstance(raw, dict) else (raw[0] if raw else None)
    if kind == "BlockStored":
        hashes = tuple(_as_int(h) for h in _field(raw, "block_hashes", 1, ()))
        parent = _field(raw, "parent_block_hash", 2)
        medium, epoch = split_medium(_field(raw, "medium", 6))
        return BlockStored(hashes, medium, None if parent is None else _as_int(parent), epoch)
    if kind == "BlockRemoved":
        hashes = tuple(_as_int(h) for h in _field(raw, "block_hashes", 1, ()))
        medium, epoch = split_medium(_field(raw, "medium", 2))
        return BlockRemoved(hashes, medium, epoch)
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    return None


def decode_batch(raw: Any) -> tuple[float, list[KVEvent], int | None]:
    """A msgpack-decoded ``EventBatch`` -> (timestamp, events, data-parallel rank)."""
    if not isinstance(raw, (list, tuple)) or len(raw) < 2:
        raise ValueError("an event batch is [ts, events, dp_rank]")
    events = [e for e in (decode_event(r) for r in raw[1]) if e is not None]
    return float(raw[0]), events, (raw[2] if len(raw) > 2 else None)


def coalesce(events: list[KVEvent]) -> list[KVEvent]:
    """``events`` with each run of consecutive removals of one medium and epoch merged into one
    ``BlockRemoved``, and each run of stores of one medium and epoch that continues a chain (the next
    one's parent is the previous one's last block) into one ``BlockStored``; order is kept otherwise.

    vLLM's block pool emits one ``BlockRemoved`` per evicted block; merged, an eviction storm is applied
    as a few index updates instead of one per block (benchmarks/kv_events_microbench.py measures both).
    """
    out: list[KVEvent] = []
    run: list[int] = []  # hashes of the run that out[-1] heads, while it grows
    for ev in events:
        if out and _continues(ev, out[-1], run):
            run.extend(ev.block_hashes)
            continue
        _close(out, run)
        out.append(ev)
        run = list(ev.block_hashes) if isinstance(ev, (BlockStored, BlockRemoved)) else []
    _close(out, run)
    return out


def _continues(ev: KVEvent, last: KVEvent, run: list[int]) -> bool:
    if type(ev) is not type(last) or isinstance(ev, AllBlocksCleared):
        return False
    if (ev.medium, ev.epoch) != (last.medium, last.epoch):
        return False
    return isinstance(ev, BlockRemoved) or (bool(run) and ev.parent_block_hash == run[-1])


def _close(out: list[KVEvent], run: list[int]) -> None:
    """Give ``out[-1]`` the hashes of its whole run (a no-op when nothing was merged into it)."""
    if not out or isinstance(out[-1], AllBlocksCleared) or len(run) == len(out[-1].block_hashes):
        return
    head = out[-1]
    if isinstance(head, BlockRemoved):
        out[-1] = BlockRemoved(tuple(run), head.medium, head.epoch)
    else:
        out[-1] = BlockStored(tuple(run), head.medium, head.parent_block_hash, head.epoch)


class SeqTracker:
    """Sequence numbers of one publisher: which batch is next, and whether one was missed.

    ``observe(seq)`` returns "ok" (next in order, or the first one seen), "dup" (already applied:
    drop it) or "gap" (batches ``expected .. seq-1`` were missed: ask for replay from ``expected``
    before applying ``seq``). After a replay that cannot fill the gap, call ``reset(seq)``.
    """

    __slots__ = ("expected",)

    def __init__(self) -> None:
        self.expected: int | None = None

    def observe(self, seq: int) -> str:
        if self.expected is None or seq == self.expected:
            self.expected = seq + 1
            return "ok"
        if seq < self.expected:
            return "dup"
        return "gap"

    def reset(self, seq: int) -> None:
        """Accept ``seq`` as the new position (the missed batches are lost)."""
        self.expected = seq + 1
