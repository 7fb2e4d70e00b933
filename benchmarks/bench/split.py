"""Splitting one run's load across N client processes, and merging what they measured.

Owns ``split_evenly``, ``split_load`` (a ``LoadSpec`` -> one spec per process), ``deal`` (warm-up
requests round-robin) and ``merge_parts`` (the processes' ``PartResult``s -> one ``RunOutcome``).
Pure: no processes, no I/O, no clock; ``procs`` does the running.

Splitting keeps the offered load (part k of N, shares as even as possible, the first parts get the
remainder):

    concurrency  C workers -> C//N or C//N+1 each        sessions: shard k of N (spec.Shard)
    rate         R req/s   -> R/N each, own arrival seed  (a sum of independent Poisson streams is Poisson at R)
    trace        every line keeps its arrival_s           lines: shard k of N (round-robin by index)
    num_requests, session width, max in flight, warm-up: split like the concurrency; duration: the same.

With ``num_requests`` the parts of a single-shot workload send exactly the requests one process
would: shard k owns positions k, k+N, ... and part k's share is the number of those below the total.

Merging: ``start_s`` of every record is moved onto the earliest part's clock (the parts' start
instants differ by a few ms); records are kept in completion order; the duration is the union's wall
window (first start to last end); the CPU time is the sum and the schedule lag the max, and each
part's own figures are kept in ``RunOutcome.processes``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from benchmarks.bench.client import RequestRecord
from benchmarks.bench.loadgen import LoadSpec, RunOutcome
from benchmarks.bench.spec import BenchRequest, Shard


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` cut into ``parts`` shares differing by at most one, the larger ones first."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(total, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]


def check_split(spec: LoadSpec, processes: int) -> None:
    """Raise ``ValueError`` (naming the flag) when ``spec`` cannot give every one of ``processes`` work."""
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    if processes == 1:
        return
    for flag, value in (("--concurrency", spec.concurrency if spec.mode == "concurrency" else None),
                        ("--num-requests", spec.num_requests), ("--session-width", spec.width),
                        ("--max-inflight", spec.max_inflight)):
        if value is not None and value < processes:
            raise ValueError(f"--processes {processes} needs {flag} >= {processes} (one each), got {value}")


def split_load(spec: LoadSpec, processes: int) -> list[LoadSpec]:
    """One ``LoadSpec`` per process (see module doc); ``[spec]`` itself for one process."""
    check_split(spec, processes)
    if processes == 1:
        return [spec]

    def shares(value: int | None) -> list[int | None]:
        return [None] * processes if value is None else split_evenly(value, processes)

    closed = spec.mode == "concurrency"
    concurrency = split_evenly(spec.concurrency, processes) if closed else [spec.concurrency] * processes
    width = split_evenly(spec.session_width, processes)  # the whole run's width (default included), cut
    return [dataclasses.replace(spec, concurrency=concurrency[k], rate=spec.rate / processes,
                                num_requests=n, warmup=w, width=max(1, width[k]), max_inflight=m,
                                shard=Shard(k, processes))
            for k, (n, w, m) in enumerate(zip(shares(spec.num_requests), split_evenly(spec.warmup, processes),
                                               shares(spec.max_inflight), strict=True))]


def deal(requests: list[BenchRequest], shard: Shard) -> list[BenchRequest]:
    """The warm-up requests of ``shard``: every ``count``-th, from its index."""
    return requests[shard.index::shard.count]


@dataclass
class PartResult:
    """What one process measured: its outcome, and when its measured phase started (wall clock, s)."""

    index: int
    outcome: RunOutcome
    started_wall_s: float


def _end_s(record: RequestRecord) -> float:
    return record.start_s + (record.e2e_s or record.ttft_s or 0.0)


def merge_parts(parts: list[PartResult]) -> RunOutcome:
    """One ``RunOutcome`` over every part's records, on the earliest part's clock (see module doc).

    The parts' records are moved, not copied: their ``start_s`` is shifted in place.
    """
    if not parts:
        raise ValueError("no process results to merge")
    parts = sorted(parts, key=lambda p: p.index)
    origin = min(p.started_wall_s for p in parts)
    merged = RunOutcome()
    records: list[RequestRecord] = []
    for part in parts:
        shift = part.started_wall_s - origin
        out = part.outcome
        for record in out.records:
            record.start_s += shift
        records += out.records
        merged.warmup_records += out.warmup_records
        merged.duration_s = max(merged.duration_s, shift + out.duration_s)
        merged.sessions_started += out.sessions_started
        merged.sessions_cut += out.sessions_cut
        merged.max_lag_s = max(merged.max_lag_s, out.max_lag_s)
        merged.client_cpu_s += out.client_cpu_s
        merged.processes.append({
            "index": part.index, "requests": len(out.records), "start_offset_ms": shift * 1000.0,
            "duration_s": out.duration_s, "cpu_s": out.client_cpu_s,
            "cpu_util": out.client_cpu_s / out.duration_s if out.duration_s > 0 else 0.0,
            "max_schedule_lag_ms": out.max_lag_s * 1000.0})
    merged.records = sorted(records, key=_end_s)  # completion order, as one process appends them
    return merged
