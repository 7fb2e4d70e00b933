"""Statistics of a run: percentiles and the summary written into the result JSON.

Owns ``percentile`` (linear interpolation between closest ranks, numpy's default method),
``distribution`` (p50/p90/p95/p99/mean/min/max/count in milliseconds) and ``summarize``. Pure functions
of the records: no I/O, no clock.

Conventions: latency distributions use successful requests only; throughput counts successful
requests' tokens over the measured phase (first send to last completion); the cache-hit rate is
total cached prompt tokens / total prompt tokens over the successful requests whose server reported
``cached_tokens`` (None when none did). Errors are counted by kind, never dropped. ``client``: CPU
seconds of the measured phase (summed over the client processes; ``cpu_util`` is that over the wall
time, so it may exceed 1 with several), the worst schedule lag, and with several processes each one's
own figures under ``processes``. ``server_timing_ms`` (only when requests carried the ingress's ``Server-Timing``,
``server_split``): each successful request's time to its first chunk split at the client's send, the ingress's
acceptance and its first chunk there.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

from benchmarks.bench.client import RequestRecord
from benchmarks.bench.loadgen import RunOutcome

_ERROR_SAMPLES = 5


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by linear interpolation; ``values`` non-empty."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def distribution(seconds: Iterable[float], scale: float = 1000.0) -> dict | None:
    """p50/p90/p95/p99/mean/min/max/count of ``seconds`` scaled (default to ms), or None if empty."""
    values = [v * scale for v in seconds if v is not None]
    if not values:
        return None
    ordered = sorted(values)
    return {
        "p50": percentile(ordered, 50), "p90": percentile(ordered, 90), "p95": percentile(ordered, 95),
        "p99": percentile(ordered, 99),
        "mean": sum(ordered) / len(ordered), "min": ordered[0], "max": ordered[-1], "count": len(ordered),
    }


def _tpot(record: RequestRecord) -> float | None:
    if record.e2e_s is None or record.ttft_s is None or not record.output_tokens or record.output_tokens < 2:
        return None
    return (record.e2e_s - record.ttft_s) / (record.output_tokens - 1)


def server_split(records: Sequence[RequestRecord]) -> dict | None:
    """Where the time to the first chunk went, over ``records`` that recorded the server's timing (None if none)::

        send        the client's send -> its request's headers start going out (its loop, its connection pool)
        to_ingress  -> the ingress accepted it (the connection, the proxy, the ingress's loop before its middleware)
        ingress     -> the ingress had the first chunk from its replica (``stages``: the ingress's own split)
        to_client   -> the client read its first chunk (the ingress writing it, the proxy, the client's loop)
    """
    timed = [r for r in records if r.accepted_s is not None and r.server_ms and "ingress" in r.server_ms
             and r.first_chunk_s is not None]
    if not timed:
        return None
    sent = [r.sent_s if r.sent_s is not None else 0.0 for r in timed]
    out = {"send": distribution(sent),
           "to_ingress": distribution(r.accepted_s - s for r, s in zip(timed, sent)),
           "ingress": distribution(r.server_ms["ingress"] / 1000 for r in timed),
           "to_client": distribution(r.first_chunk_s - r.accepted_s - r.server_ms["ingress"] / 1000 for r in timed)}
    names = dict.fromkeys(k for r in timed for k in r.server_ms if k != "ingress")
    out["stages"] = {k: distribution(r.server_ms[k] / 1000 for r in timed if k in r.server_ms) for k in names}
    return out


def summarize(outcome: RunOutcome) -> dict:
    """The ``summary`` object of the result JSON."""
    records = outcome.records
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    kinds = Counter(r.error for r in failed)
    samples = [f"{r.error}: {r.detail}" for r in failed[:_ERROR_SAMPLES]]
    duration = outcome.duration_s
    prompt_total = sum(r.prompt_tokens or 0 for r in ok)
    output_total = sum(r.output_tokens or 0 for r in ok)
    reported = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
    cached_total = sum(r.cached_tokens for r in reported)
    reported_prompt = sum(r.prompt_tokens for r in reported)
    warm_failed = Counter(r.error for r in outcome.warmup_records if not r.ok)
    client = {"cpu_s": outcome.client_cpu_s, "cpu_util": outcome.client_cpu_s / duration if duration > 0 else 0.0,
              "max_schedule_lag_ms": outcome.max_lag_s * 1000.0}
    if outcome.processes:
        client["processes"] = outcome.processes
    out = {
        "requests": {"issued": len(records), "completed": len(ok), "failed": len(failed),
                     "warmup": len(outcome.warmup_records), "warmup_failed": sum(warm_failed.values())},
        "errors": {"total": len(failed), "by_kind": dict(sorted(kinds.items())), "samples": samples,
                   "warmup_by_kind": dict(sorted(warm_failed.items()))},
        "duration_s": duration,
        "throughput": {
            "output_tok_per_s": output_total / duration if duration > 0 else 0.0,
            "input_tok_per_s": prompt_total / duration if duration > 0 else 0.0,
            "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
        },
        "ttft_ms": distribution(r.ttft_s for r in ok),
        "first_chunk_ms": distribution(r.first_chunk_s for r in ok),
        "itl_ms": distribution(x for r in ok for x in r.itl_s),
        "tpot_ms": distribution(_tpot(r) for r in ok),
        "e2e_ms": distribution(r.e2e_s for r in ok),
        "tokens": {
            "prompt_total": prompt_total, "output_total": output_total, "cached_total": cached_total,
            "cached_reported_requests": len(reported),
            "usage_missing_requests": sum(1 for r in ok if not r.usage_reported),
            "output_short_requests": sum(1 for r in ok
                                         if r.output_tokens is not None and r.output_tokens < r.max_tokens),
            "input_mismatch_requests": sum(1 for r in ok if r.input_tokens is not None and r.prompt_tokens is not None
                                           and r.prompt_tokens != r.input_tokens),
        },
        "cache_hit_rate": cached_total / reported_prompt if reported_prompt else None,
        "sessions": {"started": outcome.sessions_started, "cut_by_error": outcome.sessions_cut},
        "client": client,
    }
    split = server_split(ok)
    if split is not None:
        out["server_timing_ms"] = split
    return out


def headline(summary: dict) -> dict:
    """Flat key numbers (``ttft_p50_ms``, ``output_tok_per_s``, ...) for tables and issue results."""
    def pick(metric: str, stat: str) -> float | None:
        dist = summary.get(metric)
        return dist[stat] if dist else None

    return {
        "ttft_p50_ms": pick("ttft_ms", "p50"), "ttft_p90_ms": pick("ttft_ms", "p90"),
        "ttft_p95_ms": pick("ttft_ms", "p95"), "ttft_p99_ms": pick("ttft_ms", "p99"),
        "ttft_mean_ms": pick("ttft_ms", "mean"),
        "itl_p50_ms": pick("itl_ms", "p50"), "tpot_p50_ms": pick("tpot_ms", "p50"),
        "e2e_p50_ms": pick("e2e_ms", "p50"),
        "output_tok_per_s": summary["throughput"]["output_tok_per_s"],
        "requests_per_s": summary["throughput"]["requests_per_s"],
        "cache_hit_rate": summary["cache_hit_rate"],
        "completed": summary["requests"]["completed"], "errors": summary["errors"]["total"],
    }
