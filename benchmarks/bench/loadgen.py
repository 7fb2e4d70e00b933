"""Load generation: closed-loop concurrency, open-loop Poisson arrivals and trace replay.

Owns ``LoadSpec``, ``RunOutcome`` and ``run_load`` (``run_warmup``, then ``run_measured``). All
three modes hand out work through one ``pool.SessionPool``, which interleaves sessions round-robin
(``width`` open at once, default max(16, concurrency)).

    concurrency  ``concurrency`` workers, each sends its next ready turn as soon as its last finishes.
    rate         arrivals at exponential gaps (mean 1/rate, seeded); each arrival sends the next ready
                 turn, opening a new session when none is ready (so the request rate stays the rate).
    trace        each session starts at its ``arrival_s``; its later turns follow their predecessors.

Bounds: no new request after ``num_requests`` sends or ``duration_s`` seconds; requests in flight
then finish and count. Warm-up requests run first and are reported separately. The schedulers never
block the event loop; ``max_lag_s`` reports how late sends were against their schedule: an arrival's
time (open loop, trace), or the instant a closed-loop worker's slot freed with a turn ready (the end
of its previous request, or of the turn that made one ready).

One ``LoadSpec`` drives one process; ``benchmarks.bench.split`` cuts a spec into per-process parts
(its ``shard`` picks the part's own arrival stream) and ``procs`` runs them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from benchmarks.bench.client import RequestRecord, StreamClient
from benchmarks.bench.pool import SessionPool
from benchmarks.bench.spec import WHOLE, BenchRequest, Session, Shard

logger = logging.getLogger(__name__)

Mode = Literal["concurrency", "rate", "trace"]


@dataclass(frozen=True)
class LoadSpec:
    """How to offer load; exactly the field matching ``mode`` is used."""

    mode: Mode
    concurrency: int = 1
    rate: float = 1.0
    num_requests: int | None = None
    duration_s: float | None = None
    warmup: int = 0
    width: int | None = None
    max_inflight: int | None = None
    seed: int = 0
    shard: Shard = WHOLE

    def __post_init__(self) -> None:
        if self.mode == "concurrency" and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.mode == "rate" and self.rate <= 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration must be > 0 s, got {self.duration_s}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        for name in ("width", "max_inflight"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def session_width(self) -> int:
        """Sessions kept open at once: ``width``, else max(16, concurrency)."""
        return self.width or max(16, self.concurrency if self.mode == "concurrency" else 0)

    @property
    def level(self) -> float:
        """The load level as one number: concurrency, rate, or 0 for trace replay."""
        return {"concurrency": float(self.concurrency), "rate": self.rate, "trace": 0.0}[self.mode]

    @property
    def arrivals_key(self) -> str:
        """Seed of the Poisson arrivals: ``SEED/arrivals``, plus ``/K.N`` for part K of N processes."""
        key = f"{self.seed}/arrivals"
        return key if self.shard.count == 1 else f"{key}/{self.shard.index}.{self.shard.count}"

    @property
    def max_connections(self) -> int | None:
        """HTTP connections one process needs: the concurrency (closed loop), else ``max_inflight``."""
        return self.concurrency if self.mode == "concurrency" else self.max_inflight

    @property
    def warmup_width(self) -> int:
        """Warm-up requests sent at once: the concurrency (closed loop), else 8."""
        return self.concurrency if self.mode == "concurrency" else 8


@dataclass
class RunOutcome:
    records: list[RequestRecord] = field(default_factory=list)
    warmup_records: list[RequestRecord] = field(default_factory=list)
    duration_s: float = 0.0
    sessions_started: int = 0
    sessions_cut: int = 0
    max_lag_s: float = 0.0
    client_cpu_s: float = 0.0
    #: one entry per load-generator process when there were several (``split.merge_parts``), else empty
    processes: list[dict] = field(default_factory=list)


async def run_warmup(client: StreamClient, requests: list[BenchRequest], concurrency: int) -> list[RequestRecord]:
    """Send warm-up requests ``concurrency`` at a time; their records are kept apart."""
    limit = asyncio.Semaphore(max(1, concurrency))
    start = time.perf_counter()

    async def one(request: BenchRequest) -> RequestRecord:
        async with limit:
            return await client.send(request, start)

    return list(await asyncio.gather(*(one(r) for r in requests)))


async def run_load(client: StreamClient, sessions: Iterator[Session], spec: LoadSpec, *, keep_text: bool,
                   warmup: list[BenchRequest] | None = None) -> RunOutcome:
    """Run warm-up, then the measured phase under ``spec``; returns every record."""
    warm = await run_warmup(client, warmup, spec.warmup_width) if warmup else []
    outcome = await run_measured(client, sessions, spec, keep_text=keep_text)
    outcome.warmup_records = warm
    return outcome


async def run_measured(client: StreamClient, sessions: Iterator[Session], spec: LoadSpec, *,
                       keep_text: bool) -> RunOutcome:
    """The measured phase under ``spec``; it starts on entry (``start_s`` of the records counts from here)."""
    outcome = RunOutcome()
    run = _Run(client, sessions, spec, keep_text, outcome)
    cpu0 = time.process_time()
    if spec.mode == "concurrency":
        await asyncio.gather(*(run.worker() for _ in range(spec.concurrency)))
    elif spec.mode == "rate":
        await run.open_loop(_poisson(spec.rate, random.Random(spec.arrivals_key)))
    else:
        await run.trace()
    outcome.duration_s = time.perf_counter() - run.start
    outcome.client_cpu_s = time.process_time() - cpu0
    outcome.sessions_started = run.pool.started
    outcome.sessions_cut = run.pool.cut
    return outcome


def _poisson(rate: float, rng: random.Random) -> Iterator[float]:
    t = 0.0
    while True:
        yield t
        t += rng.expovariate(rate)


class _Run:
    """State of one measured phase: the pool, the bounds and the in-flight tasks."""

    def __init__(self, client: StreamClient, sessions: Iterator[Session], spec: LoadSpec, keep_text: bool,
                 outcome: RunOutcome) -> None:
        self.client = client
        self.sessions = sessions
        self.spec = spec
        self.keep_text = keep_text
        self.outcome = outcome
        self.pool = SessionPool(sessions, spec.session_width)
        self.issued = 0
        self.start = time.perf_counter()
        self.deadline = self.start + spec.duration_s if spec.duration_s else None
        self.inflight = asyncio.Semaphore(spec.max_inflight) if spec.max_inflight else None
        self.tasks: set[asyncio.Task] = set()
        self.last_done_s = 0.0  # closed loop: end of the latest finished request, from the run's start

    def may_issue(self) -> bool:
        if self.spec.num_requests is not None and self.issued >= self.spec.num_requests:
            return False
        return self.deadline is None or time.perf_counter() < self.deadline

    async def send(self, request: BenchRequest) -> RequestRecord:
        """Send and record one request; callers count it in ``issued`` before they yield."""
        if self.inflight is not None:
            async with self.inflight:
                record = await self.client.send(request, self.start, self.keep_text)
        else:
            record = await self.client.send(request, self.start, self.keep_text)
        self.outcome.records.append(record)
        return record

    async def send_pooled(self, session: Session, request: BenchRequest) -> None:
        self.pool.finish(session, await self.send(request))

    def spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drain(self) -> None:
        """Wait for every spawned request; the awaited tasks leave ``tasks`` here, not only through their done
        callbacks: when every task is already done, Python 3.12's ``gather`` returns without yielding to the
        loop, so a loop that waited for the callbacks to empty the set would never let them run."""
        while self.tasks:
            tasks = list(self.tasks)
            await asyncio.gather(*tasks)
            self.tasks.difference_update(tasks)

    async def sleep_until(self, due: float) -> None:
        delay = self.start + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

    def note_lag(self, due: float) -> None:
        self.outcome.max_lag_s = max(self.outcome.max_lag_s, time.perf_counter() - self.start - due)

    def done_s(self, record: RequestRecord) -> float:
        """When ``record``'s request ended, from the run's start (its ``[DONE]``, else now)."""
        if record.e2e_s is not None:
            return record.start_s + record.e2e_s
        return time.perf_counter() - self.start

    async def worker(self) -> None:
        """One closed-loop slot: send the next ready turn as soon as the last one ends.

        The send is due when the slot freed (its previous request ended; at first, the run's start) or,
        if no turn was ready then, when the turn that woke it ended; ``max_lag_s`` is the worst delay
        from due to the request's send, i.e. the time the client itself took to go on.
        """
        due = 0.0
        while self.may_issue():
            item = self.pool.take()
            if item is None:
                if self.pool.drained:
                    return
                await self.pool.wait()
                due = max(due, self.last_done_s)
                continue
            self.issued += 1
            session, request = item
            record = await self.send(request)
            self.outcome.max_lag_s = max(self.outcome.max_lag_s, record.start_s - due)
            due = self.done_s(record)
            self.last_done_s = max(self.last_done_s, due)
            self.pool.finish(session, record)

    async def open_loop(self, arrivals: Iterator[float]) -> None:
        for due in arrivals:
            await self.sleep_until(due)
            if not self.may_issue():
                break
            item = self.pool.take(force_open=True)
            while item is None and not self.pool.drained:
                await self.pool.wait()
                item = self.pool.take(force_open=True)
            if item is None:
                break
            self.note_lag(due)
            self.issued += 1
            self.spawn(self.send_pooled(*item))
        await self.drain()

    async def trace(self) -> None:
        """Start each session at its ``arrival_s``; its later turns follow one after another."""
        for session in self.sessions:
            due = session.arrival_s or 0.0
            await self.sleep_until(due)
            if not self.may_issue():
                break
            self.note_lag(due)
            request = session.next_request(None)
            if request is None:
                continue
            self.pool.started += 1
            self.issued += 1
            self.spawn(self.run_session(session, request))
        await self.drain()

    async def run_session(self, session: Session, request: BenchRequest | None) -> None:
        while request is not None:
            record = await self.send(request)
            if not record.ok:
                if session.next_request(None) is not None:
                    self.pool.cut += 1
                return
            request = session.next_request(record.text)
            if request is not None:
                if not self.may_issue():
                    return
                self.issued += 1
