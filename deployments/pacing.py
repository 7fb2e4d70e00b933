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
each on its HAProxy path, ``benchmarks/ingress_capacity.py``): while its own loop is behind (late timers, or a
thread busy more than its share), the requests it dispatches carry ``GenerateRequest.merge_chunks`` and merge for
their whole life, as do requests that do not stream. The first chunk and the last always go out at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class LoopLag:
    """How late the event loop runs a timer, in seconds (an exponentially weighted mean), how busy its thread is
    (the share of wall time it spent on a CPU, averaged over about ``busy_window_s``), and whether that counts as
    behind: a lag above ``threshold_s``, or a busy share above ``busy_threshold``, turns merging on; it turns off
    again once the lag is below half its threshold and the busy share below ``BUSY_OFF`` of its own (merging
    itself makes the loop less busy). A threshold of 0 is no trigger."""

    BUSY_OFF = 0.6

    def __init__(self, threshold_s: float, period_s: float = 0.01, alpha: float = 0.3, busy_threshold: float = 0.0,
                 busy_window_s: float = 1.0) -> None:
        self.threshold_s = threshold_s
        self.busy_threshold = busy_threshold
        self.period_s = period_s
        self.alpha = alpha
        self.busy_alpha = min(1.0, period_s / busy_window_s)
        self.lag_s = 0.0
        self.busy = 0.0
        self.behind = False

    def observe(self, late_s: float, busy: float | None = None) -> None:
        """Record one timer that fired ``late_s`` after its due time, and the loop thread's CPU share since the
        previous one."""
        self.lag_s += self.alpha * (max(late_s, 0.0) - self.lag_s)
        if busy is not None:
            self.busy += self.busy_alpha * (min(max(busy, 0.0), 1.0) - self.busy)
        lag_on = self.threshold_s > 0 and self.lag_s > self.threshold_s / (2 if self.behind else 1)
        busy_on = self.busy_threshold > 0 and self.busy > self.busy_threshold * (self.BUSY_OFF if self.behind else 1)
        self.behind = lag_on or busy_on

    async def run(self, report: Callable[[LoopLag], None] | None = None, report_every_s: float = 1.0) -> None:
        """Probe forever (a task of the loop it measures); ``report(self)`` about every ``report_every_s``."""
        reported = last = time.perf_counter()
        cpu = time.thread_time()  # this task runs on the loop's thread: that thread's CPU time
        while True:
            due = time.perf_counter() + self.period_s
            await asyncio.sleep(self.period_s)
            now, cpu_now = time.perf_counter(), time.thread_time()
            self.observe(now - due, (cpu_now - cpu) / (now - last) if now > last else None)
            last, cpu = now, cpu_now
            if report is not None and now - reported >= report_every_s:
                reported = now
                report(self)


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
