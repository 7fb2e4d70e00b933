"""The ingress replica's and the load generator's CPUs as queueing servers: ``FifoServer``, ``LoopServer``,
``PSServer`` and ``QueueServer``.

Owns the three disciplines ``path.py`` can give an ingress (``EngineModel.frontend_sharing``) and the two it can give
a bench process's core (``EngineModel.client_sharing``: ``PSServer`` or ``QueueServer``):

- ``FifoServer``: one queue, work done in arrival order; a job finishes once everything queued before it
  has. Kept for the earlier calibrations and for callers that ask for it.
- ``LoopServer``: the same queue as an asyncio loop's ready callbacks: every streamed chunk and every hop of a
  new request (``path.py``) is a callback served in arrival order, and it reports the share of a trailing
  window it was busy (what kvserve's ingress measures to decide when to ask for merged chunks).
- ``PSServer``: egalitarian processor sharing, as an asyncio loop interleaving its coroutines: the
  ``n`` jobs with work pending each get ``1/n`` of one core. A job is one request's stream through the
  ingress (its work before routing, then one cost per token on the way back, done in order); ``mark``
  names a point of that work (the route, the first token, the last token) and is handed back once
  the job's service reaches it.

- ``QueueServer``: ``PSServer``'s interface served as an asyncio loop serves its callbacks, one after the other in
  the order they were queued: every ``add`` is one callback (building and sending a request, reading a token), and
  its ``mark`` is handed back when that callback has run. Sends started together leave one after the other.

Virtual time ``v`` is the service every active job has received: ``dv/dt = 1/n``, and 0 while the core is
held (``PSServer.hold``: a blocking call on the loop, which serves no coroutine until it returns; holds queue
one after another). A job active from
``v0`` with ``w`` seconds of work is done at ``v = v0 + w``; work added to an active job moves its end.
Invariants (``tests/unit/test_simulator_frontend.py``): the work done equals the busy time (work
conserved); a lone job's delay is its cost; ``n`` equal jobs started together finish together after
``n`` times the cost. The caller schedules a wake-up at ``next_time()`` after every change and calls
``due(now)`` then; ``version`` tells a stale wake-up from the current one.
"""

from __future__ import annotations

import heapq
from collections import deque

_EPS = 1e-12


class FifoServer:
    """One core, first come first served."""

    def __init__(self) -> None:
        self.busy_until = 0.0

    def work(self, now: float, seconds: float) -> float:
        """Queue ``seconds`` of work; returns when it is done."""
        self.busy_until = max(now, self.busy_until) + seconds
        return self.busy_until


class LoopServer(FifoServer):
    """One event loop: callbacks first come, first served, and its busy share over the last ``window_s``."""

    def __init__(self, window_s: float = 1.0) -> None:
        super().__init__()
        self.window_s = window_s
        self.spans: deque[list[float]] = deque()  # [start, end] of service, adjacent callbacks coalesced
        self.work_added_s = 0.0

    def work(self, now: float, seconds: float) -> float:
        start = max(now, self.busy_until)
        end = super().work(now, seconds)
        self.work_added_s += seconds
        if seconds > 0:
            if self.spans and self.spans[-1][1] >= start - _EPS:
                self.spans[-1][1] = end
            else:
                self.spans.append([start, end])
        return end

    def hold(self, now: float, seconds: float) -> float:
        """A blocking call on the loop: nothing else runs for ``seconds`` (queued as a callback is), but its thread is
        off the CPU meanwhile, so it is not busy time."""
        return super().work(now, seconds)

    def busy_share(self, now: float) -> float:
        """Share of ``[now - window_s, now]`` spent serving callbacks (work queued past ``now`` not counted)."""
        lo = now - self.window_s
        while self.spans and self.spans[0][1] <= lo:
            self.spans.popleft()
        busy = sum(max(0.0, min(end, now) - max(start, lo)) for start, end in self.spans)
        return busy / self.window_s


class PSServer:
    """One core shared equally by its active jobs (egalitarian processor sharing)."""

    def __init__(self) -> None:
        self.v = 0.0  # virtual time: service per active job so far
        self.t = 0.0  # real time ``v`` was last brought up to
        self.ends: dict[object, float] = {}  # active job -> virtual time its pending work ends
        self._ends: list = []  # heap (v_end, seq, job), stale entries skipped
        self._marks: list = []  # heap (v_at, seq, mark)
        self._seq = 0
        self.version = 0
        self.busy_s = 0.0  # real time with at least one active job
        self.work_added_s = 0.0
        self.holds: deque[tuple[float, float]] = deque()  # (start, end) of the holds not yet over, in order

    @property
    def active(self) -> int:
        return len(self.ends)

    def _served(self, t0: float, t1: float) -> float:
        """Real time within ``[t0, t1]`` that no hold takes."""
        return (t1 - t0) - sum(max(0.0, min(end, t1) - max(start, t0)) for start, end in self.holds)

    def _advance(self, now: float) -> None:
        assert now >= self.t - 1e-9, f"time went back: {now} < {self.t}"
        if self.ends and now > self.t:
            self.v += self._served(self.t, now) / len(self.ends)
            self.busy_s += now - self.t
        self.t = max(self.t, now)
        while self.holds and self.holds[0][1] <= self.t:
            self.holds.popleft()

    def hold(self, now: float, seconds: float) -> float:
        """Serve no job for ``seconds`` once the holds already queued are over; returns when this one ends."""
        self._advance(now)
        start = max(now, self.holds[-1][1]) if self.holds else now
        if seconds > 0:
            self.holds.append((start, start + seconds))
            self.work_added_s += seconds
        return start + max(seconds, 0.0)

    def add(self, now: float, job: object, seconds: float, mark: object = None) -> None:
        """Add ``seconds`` of work to ``job`` (after what it has pending); ``mark`` is handed back by ``due``
        once this work is done."""
        self._advance(now)
        end = self.ends.get(job, self.v) + seconds
        self.ends[job] = end
        self.work_added_s += seconds
        self._seq += 1
        heapq.heappush(self._ends, (end, self._seq, job))
        if mark is not None:
            heapq.heappush(self._marks, (end, self._seq, mark))

    def next_time(self) -> float | None:
        """When the next job ends or mark is reached at the current sharing (None: idle)."""
        while self._ends and self.ends.get(self._ends[0][2]) != self._ends[0][0]:
            heapq.heappop(self._ends)
        nxt = min(x[0][0] for x in (self._ends, self._marks) if x) if (self._ends or self._marks) else None
        if nxt is None:
            return None
        need = max(0.0, nxt - self.v) * max(1, len(self.ends))  # unheld real time to get there
        t = self.t
        if need <= 0:
            return t
        for start, end in self.holds:
            if start > t:
                if t + need <= start:
                    return t + need
                need -= start - t
            t = max(t, end)
        return t + need

    def due(self, now: float) -> list:
        """Bring the server to ``now`` (no job may end strictly before it: wake at ``next_time``); returns
        the marks reached, in order, and retires the jobs whose work is done."""
        self._advance(now)
        out = []
        while self._marks and self._marks[0][0] <= self.v + _EPS:
            out.append(heapq.heappop(self._marks)[2])
        while self._ends and self._ends[0][0] <= self.v + _EPS:
            end, _, job = heapq.heappop(self._ends)
            if self.ends.get(job) == end:
                del self.ends[job]
        return out


class QueueServer(FifoServer):
    """``FifoServer``'s one queue with ``PSServer``'s ``add`` / ``next_time`` / ``due``: one core running its
    callbacks in the order they were queued (a bench process's event loop)."""

    def __init__(self) -> None:
        super().__init__()
        self._marks: list = []  # heap (time the callback has run, seq, mark)
        self._seq = 0
        self.version = 0
        self.work_added_s = 0.0

    def add(self, now: float, job: object, seconds: float, mark: object = None) -> None:
        """Queue a callback of ``seconds`` behind every one queued before (``job`` names its request, unused:
        callbacks of one request keep their order as all do); ``mark`` is handed back by ``due`` once it has run."""
        done = self.work(now, seconds)
        self.work_added_s += seconds
        if mark is not None:
            self._seq += 1
            heapq.heappush(self._marks, (done, self._seq, mark))

    def next_time(self) -> float | None:
        """When the next marked callback has run (None: none pending)."""
        return self._marks[0][0] if self._marks else None

    def due(self, now: float) -> list:
        """The marks of the callbacks run by ``now``, in the order they ran."""
        out = []
        while self._marks and self._marks[0][0] <= now + _EPS:
            out.append(heapq.heappop(self._marks)[2])
        return out
