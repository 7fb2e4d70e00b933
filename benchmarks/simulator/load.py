"""How load is offered to the simulated cluster: the simulator's twin of ``benchmarks.bench.loadgen``.

Owns ``Turn`` (one request of a session), ``SimSession`` (turns that become ready one after the
other), ``LoadPlan`` (mode, level and bounds) and ``Driver`` (the session pool and schedulers).
The semantics follow ``kvserve bench`` so a simulated cell and a GPU cell offer the same load:

    concurrency  ``concurrency`` workers; each sends its next ready turn when its last one finishes
    rate         Poisson arrivals; each sends the next ready turn, opening a new session if none is ready
    trace        each session starts at its ``arrival_s``; later turns follow their predecessors

``width`` sessions are open at once (default max(16, concurrency)); a finished turn puts its
session's next turn at the back of the ready queue. No new send after ``duration_s`` or
``num_requests`` sends; requests in flight then finish and count.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


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
    replica: str = ""  # the replica that completed it
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
                turn = None if self._stopped(0.0) else self._take(False)
                if turn is None:
                    self._idle_workers += 1
                else:
                    self._send(0.0, turn, send)
            return None
        if self.plan.mode == "rate":
            self._rng = random.Random(f"{self.plan.seed}/arrivals")
            return 0.0
        for s in self.sessions:  # trace: every session's first turn at its arrival
            turn = s.take()
            if turn is not None and not (self.plan.num_requests is not None and self.sent >= self.plan.num_requests):
                self._send(float(s.arrival_s or 0.0), turn, send)
        return None

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
