"""A replica's prefill speed as its queue of prompts drains: the ``prefill_tokens_per_s`` of ``ReplicaStats``.

Owns ``PrefillMeter``. The router ages a replica's reported queue of prefill tokens and its own fluid queue by
this speed (routers.load) and prices a prompt's prefill with it (routers.policy), so it has to be the speed at
which queued prompts actually get their first output on this replica *under its current load*: with other
requests decoding beside them and, on a shared GPU, other engines stepping.

Measured on the prompts that had prefill work to do: those whose uncached part was at least
``min_prompt_tokens``. Their uncached tokens are divided by the time during which at least one of them was
waiting for its first output (the union of their waits: a queue of them gives its throughput, a lone one its
tokens over its time to first output), over windows of at least ``window_s`` such seconds, smoothed (EWMA).
Prompts that were mostly cache hits count neither their tokens nor their time: their wait is the engine's per-step
floor, and counting it made a replica busy with hits report the rate it was fed, not the rate it can prefill
(docs/routing.md, "Load signal"). Time is an argument; memory is bounded (``MAX_SPANS``).
"""

from __future__ import annotations

MAX_SPANS = 256  # merged waiting spans kept to measure overlaps with later waits


class PrefillMeter:
    """Uncached tokens of prompts with prefill work, per second during which such a prompt was waiting."""

    def __init__(self, *, window_s: float = 0.5, min_tokens: int = 1024, min_prompt_tokens: int = 512,
                 alpha: float = 0.2) -> None:
        self.window_s = window_s
        self.min_tokens = min_tokens
        self.min_prompt_tokens = min_prompt_tokens
        self.alpha = alpha
        self.rate = 0.0  # tokens/s, 0 until the first window closes
        self._spans: list[list[float]] = []  # disjoint waiting spans [start, end], ordered, of counted prompts
        self._busy_s = 0.0  # union of counted waits since the window opened
        self._tokens = 0

    def first_output(self, now: float, uncached_tokens: int, started_at: float) -> None:
        """A prompt that arrived at ``started_at`` got its first output after prefilling ``uncached_tokens``.

        First outputs come in time order (``now`` never decreases); ``started_at`` may be any earlier time."""
        if uncached_tokens < self.min_prompt_tokens:
            return
        wait_start = merged_start = min(started_at, now)
        covered = 0.0  # of this wait, already counted by earlier waits
        spans = self._spans
        while spans and spans[-1][1] >= wait_start:  # disjoint spans, ordered: those this wait overlaps are a suffix
            s, e = spans.pop()
            covered += e - max(s, wait_start)
            merged_start = min(merged_start, s)
        spans.append([merged_start, now])
        if len(spans) > MAX_SPANS:
            del spans[0]
        self._busy_s += max(now - wait_start - covered, 0.0)
        self._tokens += uncached_tokens
        if self._busy_s >= self.window_s and self._tokens >= self.min_tokens:
            tps = self._tokens / self._busy_s
            self.rate = tps if self.rate == 0 else (1 - self.alpha) * self.rate + self.alpha * tps
            self._busy_s, self._tokens = 0.0, 0
