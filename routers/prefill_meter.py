"""A replica's prefill speed as its queue of prompts drains: the ``prefill_tokens_per_s`` of ``ReplicaStats``.

Owns ``PrefillMeter``. The router ages a replica's reported queue of prefill tokens and its own fluid queue by
this speed (routers.load) and prices a prompt's prefill with it (routers.policy), so it has to be the speed at
which queued prompts actually get their first output on this replica *under its current load*: with other
requests decoding beside them and, on a shared GPU, other engines stepping.

Measured as uncached prompt tokens that got their first output, divided by the time during which at least one
prompt was waiting for its first output ("busy" time), over windows of at least ``window_s`` busy seconds,
smoothed (EWMA). A prompt alone on an idle replica gives its own uncached tokens over its time to first output;
a queue gives its throughput (docs/routing.md, "Load signal", says why not the speed of prompts that found the
replica idle). Time is an argument; memory is constant.
"""

from __future__ import annotations


class PrefillMeter:
    """Uncached prompt tokens prefilled per second of time with prompts waiting for their first output."""

    def __init__(self, *, window_s: float = 0.5, min_tokens: int = 256, alpha: float = 0.2) -> None:
        self.window_s = window_s
        self.min_tokens = min_tokens
        self.alpha = alpha
        self.rate = 0.0  # tokens/s, 0 until the first window closes
        self._pending = 0
        self._busy_since: float | None = None
        self._busy_s = 0.0
        self._tokens = 0

    @property
    def pending(self) -> int:
        return self._pending

    def started(self, now: float) -> None:
        """A prompt reached the replica and waits for its first output."""
        if self._pending == 0:
            self._busy_since = now
        self._pending += 1

    def first_output(self, now: float, uncached_tokens: int) -> None:
        """A waiting prompt got its first output after prefilling ``uncached_tokens``."""
        self._tokens += max(uncached_tokens, 0)
        self._leave(now)

    def abandoned(self, now: float) -> None:
        """A waiting prompt left before its first output (cancelled, failed): its time counts, its tokens not."""
        self._leave(now)

    def _leave(self, now: float) -> None:
        if self._pending == 0:
            return
        self._pending -= 1
        if self._pending == 0 and self._busy_since is not None:
            self._busy_s += max(now - self._busy_since, 0.0)
            self._busy_since = None
        self._close_window(now)

    def _close_window(self, now: float) -> None:
        busy = self._busy_s + (max(now - self._busy_since, 0.0) if self._busy_since is not None else 0.0)
        if busy < self.window_s or self._tokens < self.min_tokens:
            if self._pending == 0 and self._tokens < self.min_tokens and busy >= self.window_s:
                self._busy_s, self._tokens = 0.0, 0  # idle after a window of short prompts: nothing to learn
            return
        tps = self._tokens / busy
        self.rate = tps if self.rate == 0 else (1 - self.alpha) * self.rate + self.alpha * tps
        self._busy_s, self._tokens = 0.0, 0
        if self._busy_since is not None:
            self._busy_since = now
