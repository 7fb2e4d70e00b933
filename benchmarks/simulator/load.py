"""How load is offered to the simulated cluster: the simulator's twin of ``benchmarks.bench.loadgen``.

Owns ``Turn`` (one request of a session), ``SimSession`` (turns that become ready one after the
other), ``LoadPlan`` (mode, level and bounds), ``Driver`` (the session pool and schedulers) and
``SplitDriver`` with ``split_driver`` (``kvserve bench --processes N``: N drivers, each with the
share of the load, the session shard and the arrival stream that the bench's process of that index
gets from ``benchmarks.bench.split.split_load``). The semantics follow ``kvserve bench`` so a
simulated cell and a GPU cell offer the same load:

    concurrency  ``concurrency`` workers; each sends its next ready turn when its last one finishes
    rate         Poisson arrivals; each sends the next ready turn, opening a new session if none is ready
    trace        each session starts at its ``arrival_s``; later turns follow their predecessors

``width`` sessions are open at once (default max(16, concurrency)); a finished turn puts its
session's next turn at the back of the ready queue. No new send after ``duration_s`` or
``num_requests`` sends; requests in flight then finish and count. Poisson arrivals are drawn as
the bench draws them (``LoadPlan.arrivals_key``), so a plan with the bench run's ``--seed`` and
shard sends at that run's arrival times.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from benchmarks.bench.loadgen import LoadSpec
from benchmarks.bench.spec import WHOLE, Shard
from benchmarks.bench.split import split_load


@dataclass(slots=True)
class Turn:
    """One request: prompt as chained block hashes (full blocks only), lengths, owning session."""

    prompt_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...]
    session: SimSession | None = None
    rid: int = -1
    sent_at: float = 0.0
    attempts: int = 0
    first_token: bool = False  # a first token was already streamed (a retry keeps that TTFT)
    routed_at: float = 0.0  # the ingress handed it to a replica (the replica's prefill meter times from here)
    first_at: float = 0.0  # its first token left the engine
    seen_first_at: float = 0.0  # ... and reached the client (PS front end: streamed by its ingress)
    text_from: int = 1  # its first output token with text (2: the first decodes to none; EngineModel.text_from)
    second_at: float = 0.0  # text_from 2: its second token left the engine (loop: its chunk went out)
    text_seen: bool = False  # the client has its first token with text: its TTFT is recorded
    ttft_s: float = -1.0  # that TTFT (s; -1 until then)
    replica: str = ""  # the replica that completed it
    part: int = -1  # the bench process that sent it (``SplitDriver``'s part; -1: one driver)
    ingress: object = None  # the simulated ingress that routed it (its LoadTracker hears the completion)
    streaming: bool = False  # open on its ingress (counted in its ``streams``) until its last token is streamed
    text: bool = False  # sent as text (chat messages: the ingress tokenises it), not as token ids
    pacer: object = None  # loop front end: when its chunks go out (deployments.pacing.StreamPacer, set at routing)
    #: the blocks its decode fills, continuing ``block_hashes`` in one token stream (full blocks of the prompt and
    #: all but the last output token, whose KV is never computed): vLLM caches them as they fill, so a later turn
    #: whose prompt holds this answer reuses them
    output_hashes: tuple[int, ...] = ()


@dataclass(slots=True)
class SimSession:
    """A chain of turns; ``arrival_s`` is set for trace replay."""

    key: str
    turns: list[Turn]
    arrival_s: float | None = None
    next_index: int = 0
    sticky: bool = False  # send the session key to the router (x-session-id)

    def take(self) -> Turn | None:
        if self.next_index >= len(self.turns):
            return None
        turn = self.turns[self.next_index]
        turn.session = self
        self.next_index += 1
        return turn


@dataclass(frozen=True, slots=True)
class LoadPlan:
    mode: str  # concurrency | rate | trace
    level: float = 1.0
    duration_s: float | None = None
    num_requests: int | None = None
    width: int | None = None
    seed: int = 0
    shard: Shard = WHOLE  # part ``index`` of ``count`` of a load split over bench processes (``split_driver``)

    def __post_init__(self) -> None:
        if self.mode not in ("concurrency", "rate", "trace"):
            raise ValueError(f"load mode must be concurrency, rate or trace, got {self.mode!r}")
        if self.mode != "trace" and self.level <= 0:
            raise ValueError(f"{self.mode} must be > 0, got {self.level}")
        if self.duration_s is None and self.num_requests is None and self.mode != "trace":
            raise ValueError("give duration_s or num_requests (an endless workload would never stop)")

    @property
    def session_width(self) -> int:
        return self.width or max(16, int(self.level) if self.mode == "concurrency" else 0)

    @property
    def arrivals_key(self) -> str:
        """Seed of the Poisson arrivals, the bench's own (``LoadSpec.arrivals_key``): ``SEED/arrivals``, plus
        ``/K.N`` for part K of N."""
        return self._spec().arrivals_key

    def _spec(self) -> LoadSpec:
        closed, rate = self.mode == "concurrency", self.mode == "rate"
        return LoadSpec(mode=self.mode, concurrency=int(self.level) if closed else 1,
                        rate=self.level if rate else 1.0, num_requests=self.num_requests,
                        duration_s=self.duration_s, width=self.width, seed=self.seed, shard=self.shard)

    def split(self, processes: int) -> list[LoadPlan]:
        """One plan per bench process, as ``kvserve bench --processes`` splits its ``LoadSpec``
        (``split_load``: workers, rate, width and requests shared out; each part its own arrival seed)."""
        return [replace(self, level=float(p.concurrency) if self.mode == "concurrency" else p.rate if
                        self.mode == "rate" else self.level, num_requests=p.num_requests, width=p.width,
                        shard=p.shard) for p in split_load(self._spec(), processes)]


Send = Callable[[float, Turn], None]


@dataclass
class Driver:
    """Hands turns to the simulator according to a ``LoadPlan``; all times are simulated seconds."""

    sessions: Iterator[SimSession]
    plan: LoadPlan
    sent: int = 0
    _ready: deque = field(default_factory=deque)
    _open: int = 0
    _exhausted: bool = False
    _idle_workers: int = 0
    _rng: random.Random | None = None

    def _stopped(self, now: float) -> bool:
        p = self.plan
        return ((p.duration_s is not None and now >= p.duration_s)
                or (p.num_requests is not None and self.sent >= p.num_requests))

    def _open_one(self) -> bool:
        while not self._exhausted:
            s = next(self.sessions, None)
            if s is None:
                self._exhausted = True
                return False
            turn = s.take()
            if turn is not None:
                self._open += 1
                self._ready.append(turn)
                return True
        return False

    def _take(self, force_open: bool) -> Turn | None:
        while self._open < self.plan.session_width and self._open_one():
            pass
        if not self._ready and force_open:
            self._open_one()
        return self._ready.popleft() if self._ready else None

    def _send(self, now: float, turn: Turn, send: Send) -> None:
        turn.rid, turn.sent_at = self.sent, now
        self.sent += 1
        send(now, turn)

    def begin(self, send: Send) -> float | None:
        """Start the run; returns the time of the first tick (rate mode) or None."""
        if self.plan.mode == "concurrency":
            for _ in range(int(self.plan.level)):
                self.start_worker(send)
            return None
        if self.plan.mode == "rate":
            self._rng = random.Random(self.plan.arrivals_key)
            return 0.0
        for s in self.sessions:  # trace: every session's first turn at its arrival
            turn = s.take()
            if turn is not None and not (self.plan.num_requests is not None and self.sent >= self.plan.num_requests):
                self._send(float(s.arrival_s or 0.0), turn, send)
        return None

    def start_worker(self, send: Send) -> None:
        """Concurrency mode, at the start: one worker sends its first turn (or waits for one)."""
        turn = None if self._stopped(0.0) else self._take(False)
        if turn is None:
            self._idle_workers += 1
        else:
            self._send(0.0, turn, send)

    def tick(self, now: float, send: Send) -> float | None:
        """Rate mode: one arrival now; returns the next arrival time, or None when done."""
        if self._stopped(now):
            return None
        turn = self._take(True)
        if turn is not None:
            self._send(now, turn, send)
        return now + self._rng.expovariate(self.plan.level)

    def finish(self, turn: Turn, now: float, send: Send) -> None:
        """``turn`` completed at ``now``: its session's next turn becomes ready (trace: is sent)."""
        s = turn.session
        nxt = s.take() if s is not None else None
        if self.plan.mode == "trace":
            if nxt is not None and not (self.plan.num_requests is not None and self.sent >= self.plan.num_requests):
                self._send(now, nxt, send)
            return
        if nxt is None:
            self._open -= 1
        else:
            self._ready.append(nxt)
        if self.plan.mode == "concurrency":
            workers = 1 + self._idle_workers
            self._idle_workers = 0
            for _ in range(workers):
                t = None if self._stopped(now) else self._take(False)
                if t is None:
                    self._idle_workers += 1
                else:
                    self._send(now, t, send)


class SplitDriver:
    """``kvserve bench --processes N``'s load: part k is a ``Driver`` with process k's share of the plan
    (``LoadPlan.split``) over the sessions process k owns (positions k, k+N, ... of the stream, as
    ``Shard.owns``). Sends are numbered across the parts in send order (``Turn.rid``) and carry their part
    (``Turn.part``: the client core that serves them); a finished turn goes back to its part. Concurrency and
    rate only: a trace keeps one driver (the bench's parts keep every line's arrival time)."""

    def __init__(self, sessions: Iterator[SimSession], plan: LoadPlan, processes: int) -> None:
        if plan.mode not in ("concurrency", "rate"):
            raise ValueError(f"a split load is concurrency or rate, got {plan.mode!r}")
        shards = _deal(sessions, processes)
        self.parts = [Driver(shard, part) for shard, part in zip(shards, plan.split(processes), strict=True)]
        self.sent = 0
        self._send: Send | None = None
        self._senders: list[Send] = []
        self._ticks: list[tuple[float, int]] = []  # rate mode: (next arrival, part)

    def _sender(self, k: int) -> Send:
        def send(now: float, turn: Turn) -> None:
            turn.rid, turn.part = self.sent, k
            self.sent += 1
            self._send(now, turn)
        return send

    def begin(self, send: Send) -> float | None:
        """Start every part; returns the first arrival (rate mode) or None. A closed loop's workers start one
        per part in turn (part 0's first, part 1's first, ...), as the bench's processes, started together,
        each send their workers' first requests one after the other."""
        self._send = send
        self._senders = [self._sender(k) for k in range(len(self.parts))]
        if self.parts[0].plan.mode == "concurrency":
            workers = [int(part.plan.level) for part in self.parts]
            for i in range(max(workers)):
                for k, part in enumerate(self.parts):
                    if i < workers[k]:
                        part.start_worker(self._senders[k])
            return None
        for k, part in enumerate(self.parts):
            first = part.begin(self._senders[k])
            if first is not None:
                heapq.heappush(self._ticks, (first, k))
        return self._ticks[0][0] if self._ticks else None

    def tick(self, now: float, send: Send) -> float | None:
        """Rate mode: the earliest part's arrival now; returns the next arrival of any part, or None when done."""
        _, k = heapq.heappop(self._ticks)
        nxt = self.parts[k].tick(now, self._senders[k])
        if nxt is not None:
            heapq.heappush(self._ticks, (nxt, k))
        return self._ticks[0][0] if self._ticks else None

    def finish(self, turn: Turn, now: float, send: Send) -> None:
        """``turn`` completed: its part continues."""
        self.parts[turn.part].finish(turn, now, self._senders[turn.part])


def split_driver(sessions: Iterator[SimSession], plan: LoadPlan, processes: int) -> Driver | SplitDriver:
    """The driver of a load from ``processes`` bench processes: one ``Driver`` for one process or a trace,
    else a ``SplitDriver``."""
    if processes <= 1 or plan.mode == "trace":
        return Driver(sessions, plan)
    return SplitDriver(sessions, plan, processes)


def _deal(sessions: Iterator[SimSession], count: int) -> list[Iterator[SimSession]]:
    """``count`` iterators over one stream: the k-th yields positions k, k+count, ... (``Shard.owns``),
    buffering only what one part drew ahead of another."""
    queues: list[deque[SimSession]] = [deque() for _ in range(count)]
    position = 0

    def shard(k: int) -> Iterator[SimSession]:
        nonlocal position
        while True:
            while not queues[k]:
                s = next(sessions, None)
                if s is None:
                    return
                queues[position % count].append(s)
                position += 1
            yield queues[k].popleft()

    return [shard(k) for k in range(count)]
