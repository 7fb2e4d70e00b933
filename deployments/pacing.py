"""When a vLLM replica sends a stream's next chunk: every engine step, unless an event loop on its path lags.

Owns ``LoopLag`` (a probe of how late an event loop wakes, smoothed, with hysteresis on whether the loop is
behind; the ingress runs one too, for its gauge and to ask replicas to merge) and ``StreamPacer`` (per stream: is
the output gathered so far due now?).

Every streamed chunk costs the replica a Serve message (serialization and a gRPC send, ~0.1 ms of CPU per
chunk in ``benchmarks/stream_chunks.py``) on the same event loop and GIL as vLLM's output handler. While
the loop keeps up, each engine step goes out as its own chunk, so the inter-token latency a client sees is
the engine's. When the loop falls behind (many streams, a slow host) the streams merge consecutive steps
into one chunk per ``merge_interval_s``, which cuts the messages without changing tokens/s, until the lag
has fallen below half the threshold. The ingress reads, formats and writes every chunk too (~0.14 ms of CPU
each on its HAProxy path, ``benchmarks/ingress_capacity.py``): while its own loop is behind, the requests it
dispatches carry ``GenerateRequest.merge_chunks`` and merge for their whole life, as do requests that do not
stream. The first chunk and the last always go out at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class LoopLag:
    """How late the event loop runs a timer, in seconds (an exponentially weighted mean), and whether that
    counts as behind: above ``threshold_s`` turns merging on, below half of it turns it off again."""

    def __init__(self, threshold_s: float, period_s: float = 0.01, alpha: float = 0.3) -> None:
        self.threshold_s = threshold_s
        self.period_s = period_s
        self.alpha = alpha
        self.lag_s = 0.0
        self.behind = False

    def observe(self, late_s: float) -> None:
        """Record one timer that fired ``late_s`` after its due time."""
        self.lag_s += self.alpha * (max(late_s, 0.0) - self.lag_s)
        if self.threshold_s <= 0:
            self.behind = False
        elif self.behind:
            self.behind = self.lag_s > self.threshold_s / 2
        else:
            self.behind = self.lag_s > self.threshold_s

    async def run(self, report: Callable[[float], None] | None = None, report_every_s: float = 1.0) -> None:
        """Probe forever (a task of the loop it measures); ``report(lag_s)`` about every ``report_every_s``."""
        reported = time.perf_counter()
        while True:
            due = time.perf_counter() + self.period_s
            await asyncio.sleep(self.period_s)
            now = time.perf_counter()
            self.observe(now - due)
            if report is not None and now - reported >= report_every_s:
                reported = now
                report(self.lag_s)


class StreamPacer:
    """One stream's pacing: ``due(now, finished)`` says whether what it has gathered goes out now. It merges while
    the replica's loop is behind, or for its whole life when ``merge`` (the ingress asked: its own loop was behind,
    or the request does not stream)."""

    __slots__ = ("_interval_s", "_lag", "_last_sent", "_merge")

    def __init__(self, lag: LoopLag, merge_interval_s: float, merge: bool = False) -> None:
        self._lag = lag
        self._interval_s = merge_interval_s
        self._merge = merge
        self._last_sent: float | None = None

    def due(self, now: float, finished: bool) -> bool:
        merging = self._merge or self._lag.behind
        if finished or self._last_sent is None or not merging or now - self._last_sent >= self._interval_s:
            self._last_sent = now
            return True
        return False
