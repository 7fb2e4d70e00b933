"""The arithmetic of ``benchmarks/ingress_capacity.py``: pure functions, no Ray, no HTTP.

Owns: ``chunk_times`` (when each content chunk of a streamed request arrived, from its client record),
``window_stats`` (tokens, finished requests and TTFTs inside a measurement window), ``split_cost`` (CPU
seconds per request and per token from runs of different output lengths, by least squares) and ``cost_fit``
(that split per process role over a run's levels),
``cpu_by_role`` and ``pacing`` (CPU seconds per role and the replicas' step clocks between two snapshots),
``role_of`` (which part of the serving stack a Ray process is, from its process title: ``routing_h2h.host_cpu.role``
in this benchmark's terms), ``fold_threads`` (py-spy's raw collapsed stacks, or ``benchmarks.stack_sampler``'s, ->
per thread the self and inclusive sample counts of each function, a thread's samples inside C code counted apart)
and ``fold_stacks`` (all threads together -> the functions with the most self and inclusive samples).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from benchmarks.routing_h2h import host_cpu


def chunk_times(record: Any) -> list[float]:
    """Arrival times (seconds from the run's start) of a record's content chunks: ``start_s + ttft_s``, then
    each inter-token gap after it."""
    if record.ttft_s is None:
        return []
    t = record.start_s + record.ttft_s
    times = [t]
    for gap in record.itl_s:
        t += gap
        times.append(t)
    return times


def window_stats(records: Iterable[Any], t0: float, t1: float) -> dict[str, Any]:
    """What the client saw between ``t0`` and ``t1`` (seconds from the run's start).

    Tokens: each content chunk arriving in the window counts ``output_tokens / content_chunks`` (1 unless the
    replica merged steps). Requests: those whose ``[DONE]`` arrived in the window. TTFTs: of the requests
    whose first token arrived in it. Errors: failed records that started in it.
    """
    tokens = 0.0
    chunks = 0
    done = 0
    errors = 0
    ttfts: list[float] = []
    e2es: list[float] = []
    for r in records:
        if not r.ok:
            errors += t0 <= r.start_s < t1
            continue
        times = chunk_times(r)
        per_chunk = (r.output_tokens or len(times)) / max(len(times), 1)
        inside = sum(1 for t in times if t0 <= t < t1)
        chunks += inside
        tokens += inside * per_chunk
        if times and t0 <= times[0] < t1:
            ttfts.append(r.ttft_s)
        if t0 <= r.start_s + r.e2e_s < t1:
            done += 1
            e2es.append(r.e2e_s)
    return {"tokens": tokens, "chunks": chunks, "requests": done, "errors": errors, "ttfts": ttfts, "e2es": e2es}


def cpu_by_role(a: dict, b: dict, pids: dict[int, str]) -> dict[str, float]:
    """CPU seconds of each role between two snapshots (``{"pids": {pid: cpu_s}, "client": s, "machine_busy": s}``);
    processes in both only."""
    roles: dict[str, float] = {}
    for pid, cpu in b["pids"].items():
        if pid in a["pids"]:
            roles[pids[pid]] = roles.get(pids[pid], 0.0) + cpu - a["pids"][pid]
    roles["client"] = b["client"] - a["client"]
    roles["machine_busy"] = b["machine_busy"] - a["machine_busy"]
    return roles


def pacing(a: dict[int, dict], b: dict[int, dict], window_s: float, step_ms: float) -> dict:
    """The replicas' step clocks over the window: steps kept vs due, and the mean lateness of a step."""
    steps = [b[p]["steps"] - a[p]["steps"] for p in b if p in a]
    late = [b[p]["late_s"] - a[p]["late_s"] for p in b if p in a]
    if not steps:
        return {}
    return {"steps_per_s_target": round(1000 / step_ms, 1),
            "steps_per_s_kept": [round(s / window_s, 1) for s in steps],
            "late_ms_per_step": [round(1000 * lt / max(s, 1), 2) for s, lt in zip(steps, late, strict=True)]}


def split_cost(rows: Sequence[tuple[float, float, float]]) -> tuple[float, float] | None:
    """(CPU s per request, CPU s per token) fitting ``cpu = a * requests + b * tokens`` to ``rows`` of
    (requests, tokens, cpu_s) by least squares; None unless the rows have at least two tokens-per-request
    ratios (with one, requests and tokens are proportional and the split is undetermined)."""
    srr = sum(r * r for r, _, _ in rows)
    stt = sum(t * t for _, t, _ in rows)
    srt = sum(r * t for r, t, _ in rows)
    src = sum(r * c for r, _, c in rows)
    stc = sum(t * c for _, t, c in rows)
    det = srr * stt - srt * srt
    if det <= 1e-9 * max(srr * stt, 1e-300):
        return None
    return (src * stt - stc * srt) / det, (stc * srr - src * srt) / det


def cost_fit(levels: Sequence[dict], roles: Sequence[str], output_lens: Sequence[int],
             min_pace: float = 0.8) -> dict[str, Any]:
    """``split_cost`` of each role's CPU over the benchmark's levels, and the tokens/s one core of it sustains at
    each output length. Levels where a replica's step clock kept less than ``min_pace`` of its target (a replica
    still warming up, or starved) are left out; so are levels without finished requests."""
    used = [lv for lv in levels if lv["requests"] and all(
        k >= min_pace * lv["replica_pacing"]["steps_per_s_target"]
        for k in lv["replica_pacing"].get("steps_per_s_kept", []))]
    out: dict[str, Any] = {"levels_used": [(lv["concurrency"], lv["output_len"]) for lv in used]}
    for role in roles:
        fit = split_cost([(lv["requests"], lv["tokens"], lv["cpu_cores"].get(role, 0.0) * lv["window_s"])
                          for lv in used])
        if fit is None:
            continue
        per_req, per_tok = fit
        out[role] = {"cpu_ms_per_request": round(1000 * per_req, 3), "cpu_us_per_token": round(1e6 * per_tok, 2),
                     "tok_per_s_per_core": {n: round(1 / cost) if (cost := per_tok + per_req / n) > 0 else None
                                            for n in output_lens}}
    return out


def role_of(title: str) -> str:
    """``ingress``, ``replica``, ``proxy``, ``controller``, ``haproxy`` or ``ray_other`` (raylet, GCS, idle workers)
    of a Ray process's title (``ray::ServeReplica:kvserve:ingress`` ...): ``host_cpu.role`` with Serve's own two
    processes apart and the rest of Ray together."""
    r = host_cpu.role(title)
    if r == "serve":
        return "proxy" if "ProxyActor" in title else "controller"
    return r if r in ("ingress", "replica", "haproxy") else "ray_other"


_LINE_NO = re.compile(r":\d+\)$")


def _frame(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)`` with the last two path parts: samples of one function
    add up across its lines."""
    name, _, where = frame.partition(" (")
    path = _LINE_NO.sub(")", "(" + where) if where else ""
    parts = path.strip("()").split("/")
    return f"{name} ({'/'.join(parts[-2:])})" if where else name


def _opaque(frame: str) -> bool:
    """A thread's ``run`` as the innermost Python frame (``run``, py-spy's ``Thread.run`` / ``_WorkItem.run``): the
    thread is in C code it called (uvloop's event loop, gRPC's poller, an executor's native call), waiting or
    working, which a stack cannot tell apart."""
    name, _, where = frame.partition(" (")
    return name.rpartition(".")[2] == "run" and where.endswith(("threading.py)", "futures/thread.py)"))


@dataclasses.dataclass
class FoldedThread:
    """One thread's samples: ``own`` (innermost frame) and ``incl`` (every frame once per sample) counts of the
    Python samples, ``samples`` their number, ``opaque`` the samples inside C code (``_opaque``)."""

    own: Counter[str] = dataclasses.field(default_factory=Counter)
    incl: Counter[str] = dataclasses.field(default_factory=Counter)
    samples: int = 0
    opaque: int = 0


def fold_threads(lines: Iterable[str]) -> dict[str, FoldedThread]:
    """py-spy ``--format raw`` lines (``frame;frame;...;leaf count``, root first; with ``--threads`` the first frame
    names the thread, ``process ...;thread ...`` with both) -> thread -> its folded samples (``all`` where the
    lines name no thread). Frames are shortened by ``_frame``; lines that are not samples are skipped."""
    out: dict[str, FoldedThread] = {}
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = "all"
        while frames and frames[0].startswith(("process ", "thread ")):
            if frames[0].startswith("thread "):
                thread = frames[0]
            frames = frames[1:]
        if not frames:
            continue
        frames = [_frame(f) for f in frames]
        t = out.setdefault(thread, FoldedThread())
        if _opaque(frames[-1]):
            t.opaque += n
            continue
        t.samples += n
        t.own[frames[-1]] += n
        for f in set(frames):
            t.incl[f] += n
    return out


def fold_stacks(lines: Iterable[str], top: int = 25) -> dict[str, Any]:
    """All threads of ``fold_threads`` together -> the ``top`` functions by self samples and by inclusive samples,
    each as (function, share of the Python samples); samples inside C code are counted apart (``opaque_samples``)."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = opaque = 0
    for t in fold_threads(lines).values():
        own.update(t.own)
        incl.update(t.incl)
        total += t.samples
        opaque += t.opaque
    share = (lambda c: [(f, round(k / total, 4)) for f, k in c.most_common(top)]) if total else (lambda c: [])
    return {"samples": total, "opaque_samples": opaque, "self": share(own), "inclusive": share(incl)}
