"""What ran beside each request of a bench run: its TTFT against the requests in flight and the replicas busy when it
was sent.

Owns ``beside`` (per request of a ``kvserve bench --per-request`` result: how many other requests were in flight
when it was sent, anywhere; where rows name their replica, ``RequestRecord.replica`` from kvserve's
``x-kvserve-replica`` header, also how many other replicas had a request in flight then and how many requests its
own replica had), ``summarise`` (TTFT p50 and mean, and the requests' TPOT p50, per count) and a CLI over bench JSONs
or the log archives a routing run leaves (``benchmarks/results/logs/*.tgz``, members matched by ``--cell``)::

    python -m benchmarks.routing_h2h.beside RESULT.json|LOGS.tgz [...] [--cell kv-aware-no-sharing-r25] [--out F]

On replicas sharing one GPU a request sent beside more busy replicas meets more contention
(``benchmarks/gpu/colocated_contention.py`` measures it per peer); a policy that sends to idle replicas trades queueing
on its own replica for that. A request is in flight from its send (``start_s``) to its last token (``start_s +
e2e_s``); a row without an end (failed) is in flight nowhere, and a row without a TTFT is not measured. A request's
TPOT is ``(e2e_s - ttft_s) / (output_tokens - 1)`` (rows with more than one output token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

from benchmarks.bench.result import git_commit, machine_info
from benchmarks.simulator.client_fit import bench_docs


def beside(rows: list[dict]) -> list[dict]:
    """Per measured request with a TTFT: ``in_flight`` (other requests in flight at its send, on any replica), its
    ``ttft_ms`` and ``tpot_ms`` (None for one output token); where the rows name replicas, ``busy_others`` (other
    replicas with a request in flight then) and ``same`` (requests in flight on its own replica, itself excluded),
    None for a row without one."""
    spans: dict[str | None, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r.get("e2e_s") is not None:
            spans[r.get("replica")].append((r["start_s"], r["start_s"] + r["e2e_s"]))
    out = []
    for r in rows:
        if not (r.get("ok") and r.get("ttft_s") is not None):
            continue
        t, mine = r["start_s"], r.get("replica")
        on = {rep: sum(1 for s, e in v if s <= t < e) for rep, v in spans.items()}  # a cell: a few thousand at most
        n = r.get("output_tokens")
        tokens = (r["e2e_s"] - r["ttft_s"]) / (n - 1) * 1e3 if n and n > 1 and r.get("e2e_s") is not None else None
        out.append({"replica": mine, "start_s": t, "ttft_ms": r["ttft_s"] * 1e3, "tpot_ms": tokens,
                    "in_flight": sum(on.values()) - 1,
                    "busy_others": sum(1 for rep, k in on.items() if k and rep not in (mine, None)) if mine else None,
                    "same": max(on[mine] - 1, 0) if mine else None})
    return out


def summarise(per_request: list[dict]) -> dict:
    """TTFT p50 and mean (ms), TPOT p50 (ms) and the count, per number of other requests in flight (with, where rows
    name their replica, how many of them were sent onto a replica already busy: ``stacked``, and their TTFT p50) and,
    over the rows naming their replica, per number of busy other replicas and per number on the same replica."""
    def group(key: str) -> dict:
        by: dict[int, list[dict]] = defaultdict(list)
        for p in per_request:
            if p[key] is not None:
                by[p[key]].append(p)
        out = {}
        for k, ps in sorted(by.items()):
            ttfts, tpots = [p["ttft_ms"] for p in ps], [p["tpot_ms"] for p in ps if p["tpot_ms"] is not None]
            out[str(k)] = {"n": len(ps), "ttft_p50_ms": round(statistics.median(ttfts), 2),
                           "ttft_mean_ms": round(statistics.fmean(ttfts), 2),
                           "tpot_p50_ms": round(statistics.median(tpots), 3) if tpots else None}
            if key == "in_flight" and any(p["same"] is not None for p in ps):  # sent onto a replica already busy
                stacked = [p["ttft_ms"] for p in ps if p["same"]]
                out[str(k)]["stacked"] = len(stacked)
                out[str(k)]["stacked_ttft_p50_ms"] = round(statistics.median(stacked), 2) if stacked else None
        return out

    def mean(key: str) -> float | None:
        vals = [p[key] for p in per_request if p[key] is not None]
        return round(statistics.fmean(vals), 3) if vals else None

    return {"requests": len(per_request), "in_flight_mean": mean("in_flight"), "by_in_flight": group("in_flight"),
            "named": sum(1 for p in per_request if p["replica"]), "busy_others_mean": mean("busy_others"),
            "by_busy_others": group("busy_others"), "by_same_replica": group("same")}


def _docs(paths: list[str], cell: str | None):
    """(label, bench JSON) of each input: a ``.json`` under its name, an archive's members (``--cell``'s only) as
    ``ARCHIVE:PATH-IN-IT`` (one archive may hold a cell of several runs)."""
    for p in map(Path, paths):
        for name, doc in bench_docs(p, member_paths=True):
            if p.suffix == ".json":
                yield name, doc
            elif cell is None or Path(name).name == f"{cell}.json":
                yield f"{p.name}:{name}", doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.routing_h2h.beside", description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="bench result JSONs (--per-request) or routing log archives (.tgz)")
    ap.add_argument("--cell", help="in archives, only the bench JSON of this cell (e.g. kv-aware-no-sharing-r25)")
    ap.add_argument("--out", help="write the summaries as JSON here")
    args = ap.parse_args(argv)
    results, skipped = {}, []
    try:
        for name, doc in _docs(args.inputs, args.cell):
            rows = doc.get("requests") if isinstance(doc, dict) else None
            measured = beside(rows) if rows else []
            if not measured:
                skipped.append(name)
                continue
            results[name] = summarise(measured)
    except (OSError, ValueError, tarfile.TarError) as exc:
        print(f"beside: {exc}", file=sys.stderr)
        return 2
    if not results:
        print(f"beside: no per-request rows with a TTFT in {', '.join(skipped) or 'the inputs'} (run the bench with "
              "--per-request)", file=sys.stderr)
        return 2
    for name, s in results.items():
        print(f"{name}: {s['requests']} requests, {s['in_flight_mean']} others in flight at a send on average")
        for k, g in s["by_in_flight"].items():
            onto = (f", {g['stacked']} onto a busy replica (TTFT p50 {g['stacked_ttft_p50_ms']})"
                    if "stacked" in g else "")
            print(f"  {k} in flight: n={g['n']} TTFT p50 {g['ttft_p50_ms']} ms, mean {g['ttft_mean_ms']}, "
                  f"TPOT p50 {g['tpot_p50_ms']}{onto}")
        if not s["named"]:
            print("  (no row names its replica: busy replicas need an ingress with expose_replica_header)")
            continue
        print(f"  {s['named']} naming their replica, {s['busy_others_mean']} other replicas busy at a send on average")
        for k, g in s["by_busy_others"].items():
            print(f"  {k} other busy: n={g['n']} TTFT p50 {g['ttft_p50_ms']} ms, mean {g['ttft_mean_ms']}")
        for k, g in s["by_same_replica"].items():
            print(f"  {k} on its replica: n={g['n']} TTFT p50 {g['ttft_p50_ms']} ms, mean {g['ttft_mean_ms']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(["python -m benchmarks.routing_h2h.beside",
                                                                   *(argv if argv is not None else sys.argv[1:])]),
                                              "machine": machine_info(), "git_commit": git_commit(),
                                              "results": results, "skipped": skipped}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
