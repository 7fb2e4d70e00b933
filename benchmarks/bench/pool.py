"""Where the load generator's next request comes from: ``SessionPool``.

Owns the round-robin interleaving of sessions shared by all three load modes: it keeps ``width``
sessions open (``LoadSpec.session_width``); a finished turn puts that session's next turn at the
back of the ready queue, so multi-turn sessions interleave and single-shot workloads simply stream
through. A failed turn ends its session (counted in ``cut`` when turns were left). Single event
loop, no locks: ``wait`` parks a coroutine until the next ``finish``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator

from benchmarks.bench.client import RequestRecord
from benchmarks.bench.spec import BenchRequest, Session


class SessionPool:
    """Round-robin source of ready turns over at most ``width`` open sessions (see module doc)."""

    def __init__(self, sessions: Iterator[Session], width: int) -> None:
        self._source = sessions
        self._width = max(1, width)
        self._ready: deque[tuple[Session, BenchRequest]] = deque()
        self._open = 0
        self._exhausted = False
        self._waiters: list[asyncio.Future] = []
        self.started = 0
        self.cut = 0

    @property
    def drained(self) -> bool:
        """True when no session is open or ready and the source is exhausted."""
        return self._exhausted and self._open == 0 and not self._ready

    def _open_one(self) -> bool:
        while not self._exhausted:
            session = next(self._source, None)
            if session is None:
                self._exhausted = True
                return False
            request = session.next_request(None)
            if request is not None:
                self._open += 1
                self.started += 1
                self._ready.append((session, request))
                return True
        return False

    def take(self, force_open: bool = False) -> tuple[Session, BenchRequest] | None:
        """Return the next ready turn, or None when every open session awaits an answer."""
        while self._open < self._width and self._open_one():
            pass
        if not self._ready and force_open:
            self._open_one()
        return self._ready.popleft() if self._ready else None

    def finish(self, session: Session, record: RequestRecord) -> None:
        """Feed the answer back; the session's next turn (if any) joins the back of the queue.

        A failed turn ends its session; if turns were left, the session counts as ``cut``.
        """
        if record.ok:
            request = session.next_request(record.text)
        else:
            request = None
            if session.next_request(None) is not None:
                self.cut += 1
        if request is None:
            self._open -= 1
        else:
            self._ready.append((session, request))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        """Wait until some turn finishes."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter
