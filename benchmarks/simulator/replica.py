"""State of the simulated engines: each replica's GPU prefix cache and queue, and the shared KV tier.

Owns ``Replica`` and ``ObjectTier``. Both are LRUs of chained block hashes; a prompt reuses the
longest run of leading blocks present (GPU first, then the tier continues where the GPU stops), as
vLLM's prefix cache and the connector's lookup do. ``insert``/``put``/``evict_unreferenced`` return
what changed so the simulator can emit the matching KV events (BlockStored/BlockRemoved, medium
"GPU" or "OBJ").

A replica's KV blocks are one pool of ``capacity_blocks``, as vLLM's block pool is::

    | held by admitted requests (ref > 0)        | cached, unreferenced (evictable) | free |
    | prompt blocks, shared ones once; + tails   | LRU order, oldest evicted first  |      |
    '------------- held_blocks -----------------'
    '--------------------------- <= capacity_blocks ---------------------------------------'

``admit`` takes a request only if free + evictable blocks cover its new ones (blocks not already held;
a cached block it reuses leaves the evictable set); ``evict_unreferenced`` then drops the oldest
unreferenced cached blocks until the pool fits; ``release`` returns a finished request's blocks to the
evictable set, most recently used (its prompt's head last to go). Without admission nothing is held
and the cache is a plain LRU of ``capacity_blocks``.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.simulator.load import Turn
from routers.prefill_meter import PrefillMeter


def leading(held, hashes: Sequence[int]) -> int:
    """How many of ``hashes``, from the first, are in ``held`` (up to the first missing one)."""
    n = 0
    for h in hashes:
        if h not in held:
            break
        n += 1
    return n

@dataclass(eq=False, slots=True)
class Job:
    """A turn on a replica: its cache lookup (taken when it first reaches the scheduler) and progress."""

    turn: Turn
    looked_up: bool = False
    cached: int = 0
    from_tier: int = 0
    remaining: int = 0  # prefill tokens still to compute
    ready_at: float = 0.0  # tier load done
    first_token_step: int = 0
    not_before: int = 0  # the first step it may join (async scheduling: the next one was formed before it came)
    enqueued_at: float = 0.0  # it reached the replica's scheduler
    started_at: float | None = None  # the step with its first prefill chunk started
    admitted: bool = False  # holds its KV blocks (kv_admission)
    tail_blocks: int = 0  # its blocks beyond the hashed prompt blocks (partial block, output)


@dataclass(eq=False)
class Replica:
    """One engine: waiting jobs (FIFO, the head ones get prefill chunks), decoding jobs, its GPU cache.

    ``finishing[k]`` holds the jobs whose last output token comes out of step ``k``.
    """

    rid: str
    gpu: int
    capacity_blocks: int
    alive: bool = True
    ready: bool = True
    stepping: bool = False
    prefilling: bool = False  # its current step carries prefill chunks
    lru: OrderedDict = field(default_factory=OrderedDict)
    waiting: deque = field(default_factory=deque)
    loading: list = field(default_factory=list)
    finishing: dict = field(default_factory=dict)
    second: dict = field(default_factory=dict)  # step -> turns whose second token it ends and whose first had no text
    running: int = 0
    context_tokens: int = 0
    steps: int = 0
    served: int = 0
    input_until: float = 0.0  # its front end's queued work ends
    entering: int = 0  # routed here, still in its front end
    held: dict = field(default_factory=dict)  # block hash -> admitted jobs using it (kv_admission)
    held_tail: int = 0  # admitted jobs' unhashed blocks
    held_uncached: int = 0  # held hashes not (yet) in ``lru``: their prefill has not finished
    meter: PrefillMeter = field(default_factory=PrefillMeter)  # its prefill speed as the real replica measures it

    @property
    def held_blocks(self) -> int:
        return len(self.held) + self.held_tail

    def admit(self, job: Job, capacity: int, block_size: int) -> bool:
        """Reserve ``job``'s whole length in KV blocks if free + evictable blocks cover its new ones (its
        prompt's blocks already held by admitted jobs count once; a cached block it reuses stops being
        evictable); a job alone on the replica always fits. The caller then evicts (``evict_unreferenced``)."""
        turn = job.turn
        hashes = turn.block_hashes
        tail = max(0, -(-(turn.prompt_tokens + turn.output_tokens) // block_size) - len(hashes))
        need = sum(1 for h in hashes if h not in self.held) + tail
        if self.held_blocks and self.held_blocks + need > capacity:
            return False
        for h in hashes:
            n = self.held.get(h, 0)
            if n == 0 and h not in self.lru:
                self.held_uncached += 1
            self.held[h] = n + 1
        self.held_tail += tail
        job.admitted, job.tail_blocks = True, tail
        return True

    @property
    def pool_blocks(self) -> int:
        """Blocks in use: cached (referenced or not), held but not yet cached, and the held tails."""
        return len(self.lru) + self.held_uncached + self.held_tail

    def evict_unreferenced(self) -> list[int]:
        """Drop the oldest cached blocks no admitted job holds until the pool fits; returns them, oldest first."""
        over = self.pool_blocks - self.capacity_blocks
        removed = []
        if over <= 0:
            return removed
        for h in self.lru:
            if h not in self.held:
                removed.append(h)
                if len(removed) == over:
                    break
        for h in removed:
            del self.lru[h]
        return removed

    def cache(self, hashes: Sequence[int]) -> list[int]:
        """Put ``hashes`` at the recent end of the cache, the first of them most recent; returns those it lacked, in
        order. No eviction: the callers evict when their accounting allows (``insert`` at once; a finished job's
        decode blocks, ``Turn.output_hashes``, after ``release``, which then moves its prompt's blocks to the recent
        end, so a request's tail goes first, as vLLM frees it)."""
        lru, stored = self.lru, []
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                stored.append(h)
                if h in self.held:
                    self.held_uncached -= 1
        stored.reverse()
        return stored

    def release(self, job: Job) -> None:
        """``job`` finished: its blocks no other job holds become evictable, most recent (its head last to go)."""
        if not job.admitted:
            return
        for h in reversed(job.turn.block_hashes):
            n = self.held.get(h, 0) - 1
            if n > 0:
                self.held[h] = n
                continue
            self.held.pop(h, None)
            if h in self.lru:
                self.lru.move_to_end(h)
            else:
                self.held_uncached -= 1
        self.held_tail -= job.tail_blocks
        job.admitted = False

    @property
    def busy(self) -> bool:
        return self.stepping

    @property
    def ongoing(self) -> int:
        return self.entering + len(self.waiting) + len(self.loading) + self.running

    def gpu_prefix(self, hashes: Sequence[int]) -> int:
        """Leading blocks of ``hashes`` held on the GPU."""
        return leading(self.lru, hashes)

    def touch(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self.lru.move_to_end(h)

    def insert(self, hashes: Sequence[int]) -> tuple[list[int], list[int]]:
        """Cache ``hashes`` (most recent last, the prompt's head kept longest); returns (stored, evicted)."""
        stored = self.cache(hashes)
        return stored, self.evict_unreferenced()

    def take_all(self) -> list[Turn]:
        """Everything this replica holds (it failed): waiting, loading and decoding turns."""
        jobs = list(self.waiting) + self.loading + [j for js in self.finishing.values() for j in js]
        self.waiting.clear()
        self.loading.clear()
        self.finishing.clear()
        self.running = self.context_tokens = 0
        self.held.clear()
        self.held_tail = self.held_uncached = 0
        self.stepping = self.prefilling = False
        self.meter = PrefillMeter()
        return [j.turn for j in jobs]


class ObjectTier:
    """The shared object-store tier: block hash -> the replica that stored it, LRU within a block budget."""

    def __init__(self, budget_blocks: int) -> None:
        if budget_blocks < 1:
            raise ValueError("the tier budget must be >= 1 block")
        self.budget = budget_blocks
        self.lru: OrderedDict[int, str] = OrderedDict()

    def prefix(self, hashes: Sequence[int], start: int) -> int:
        """Blocks present in the tier from ``hashes[start]`` on, up to the first missing one."""
        return leading(self.lru, hashes[start:])

    def touch(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self.lru.move_to_end(h)

    def put(self, hashes: Sequence[int], reporter: str) -> tuple[list[int], dict[str, list[int]]]:
        """Store the blocks not yet held; returns (stored, evicted per reporter)."""
        stored, evicted = [], {}
        for h in hashes:
            if h in self.lru:
                self.lru.move_to_end(h)
            else:
                self.lru[h] = reporter
                stored.append(h)
        while len(self.lru) > self.budget:
            h, who = self.lru.popitem(last=False)
            evicted.setdefault(who, []).append(h)
        return stored, evicted

    def drop_reporter(self, reporter: str) -> int:
        """The replica that stored these objects died: they die with it (Ray's ownership)."""
        gone = [h for h, who in self.lru.items() if who == reporter]
        for h in gone:
            del self.lru[h]
        return len(gone)
