"""Mooncake replay at a chosen mean rate: which trace lines a run replays and how much faster.

Owns ``TraceReplay`` and ``trace_replay``. A run at target rate ``R`` for ``D`` seconds replays the
first ``N = max(2, round(R * D))`` lines (from ``start``); their timestamps span ``S`` seconds, so the
trace's own mean rate over them is ``(N - 1) / S`` and the bench's ``--time-scale`` (timestamps
divided by it) is ``R * S / (N - 1)``. The last request is then due at ``(N - 1) / R <= D``, so a
``--duration D`` bound sends all ``N``, with the trace's own gaps and bursts, scaled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class TraceReplay:
    """Bench arguments of one replay and the arithmetic behind them."""

    num_requests: int
    span_s: float
    trace_rate_per_s: float
    target_rate_per_s: float
    time_scale: float

    def bench_args(self) -> list[str]:
        return ["--trace", "--time-scale", f"{self.time_scale:.6g}", "--num-requests", str(self.num_requests)]

    def as_dict(self) -> dict:
        return asdict(self)


def time_scale_for(timestamps_ms: list[float], target_rate_per_s: float) -> TraceReplay:
    """The replay of exactly these timestamps whose mean arrival rate is ``target_rate_per_s``."""
    if target_rate_per_s <= 0:
        raise ValueError(f"target rate must be > 0 requests/s, got {target_rate_per_s}")
    n = len(timestamps_ms)
    span_s = (max(timestamps_ms) - min(timestamps_ms)) / 1000.0 if n else 0.0
    if n < 2 or span_s <= 0:
        raise ValueError(f"{n} trace lines spanning {span_s} s have no mean rate: replay more lines")
    trace_rate = (n - 1) / span_s
    return TraceReplay(num_requests=n, span_s=span_s, trace_rate_per_s=round(trace_rate, 6),
                       target_rate_per_s=target_rate_per_s, time_scale=target_rate_per_s / trace_rate)


def trace_replay(path: Path, target_rate_per_s: float, duration_s: float, start: int = 0) -> TraceReplay:
    """The replay of ``path`` from line ``start`` at ``target_rate_per_s`` for about ``duration_s`` seconds."""
    want = max(2, round(target_rate_per_s * duration_s))
    stamps: list[float] = []
    with Path(path).open() as f:
        for index, line in enumerate(f):  # blank lines and ``start`` counted as MooncakeWorkload counts them
            if not line.strip() or index < start:
                continue
            stamps.append(float(json.loads(line)["timestamp"]))
            if len(stamps) == want:
                break
    return time_scale_for(stamps, target_rate_per_s)
