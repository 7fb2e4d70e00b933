"""What ran beside each request of a bench run: its TTFT against the replicas busy when it was sent.

Owns ``beside`` (per request of a ``kvserve bench --per-request`` result whose rows name their replica,
``RequestRecord.replica`` from kvserve's ``x-kvserve-replica`` header: how many other replicas had a request in flight
when it was sent, and how many requests its own replica had), ``summarise`` (TTFT p50 and mean per count of busy
other replicas and per count on its own replica) and a CLI over bench JSONs or the log archives a routing run leaves
(``benchmarks/results/logs/*.tgz``, members matched by ``--cell``)::

    python -m benchmarks.routing_h2h.beside RESULT.json|LOGS.tgz [...] [--cell kv-aware-no-sharing-r25] [--out F]

On replicas sharing one GPU a request sent beside more busy replicas meets more contention
(``benchmarks/gpu/colocated_contention.py`` measures it per peer); a policy that sends to idle replicas trades queueing
on its own replica for that. A request is in flight from its send (``start_s``) to its last token (``start_s +
e2e_s``); a row without an end (failed) is in flight nowhere, and a row without a replica or a TTFT is not measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

from benchmarks.simulator.client_fit import bench_docs


def beside(rows: list[dict]) -> list[dict]:
    """Per measured request with a replica and a TTFT: ``busy_others`` (other replicas with a request in flight at its
    send), ``same`` (requests in flight on its own replica then, itself excluded) and its ``ttft_ms``."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r.get("replica") and r.get("e2e_s") is not None:
            spans[r["replica"]].append((r["start_s"], r["start_s"] + r["e2e_s"]))
    out = []
    for r in rows:
        if not (r.get("ok") and r.get("replica") and r.get("ttft_s") is not None):
            continue
        t = r["start_s"]
        busy, same = 0, 0
        for rep, v in spans.items():
            n = sum(1 for s, e in v if s <= t < e)  # in flight at t (a cell holds a few thousand requests at most)
            if rep == r["replica"]:
                same = max(n - 1, 0)  # itself excluded
            elif n:
                busy += 1
        out.append({"replica": r["replica"], "start_s": t, "ttft_ms": r["ttft_s"] * 1e3, "busy_others": busy,
                    "same": same})
    return out


def summarise(per_request: list[dict]) -> dict:
    """TTFT p50 and mean (ms) and the count, per number of busy other replicas and per number on the same replica."""
    def group(key: str) -> dict:
        by: dict[int, list[float]] = defaultdict(list)
        for p in per_request:
            by[p[key]].append(p["ttft_ms"])
        return {str(k): {"n": len(v), "ttft_p50_ms": round(statistics.median(v), 2),
                         "ttft_mean_ms": round(statistics.fmean(v), 2)} for k, v in sorted(by.items())}

    n = len(per_request)
    return {"requests": n, "by_busy_others": group("busy_others"), "by_same_replica": group("same"),
            "busy_others_mean": round(sum(p["busy_others"] for p in per_request) / n, 3) if n else None}


def _docs(paths: list[str], cell: str | None):
    """(label, bench JSON) of each input: a ``.json`` under its name, an archive's members (``--cell``'s only) as
    ``ARCHIVE:MEMBER``."""
    for p in map(Path, paths):
        for name, doc in bench_docs(p):
            if p.suffix == ".json":
                yield name, doc
            elif cell is None or name == f"{cell}.json":
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
            if not rows or not any(r.get("replica") for r in rows):
                skipped.append(name)
                continue
            results[name] = summarise(beside(rows))
    except (OSError, ValueError, tarfile.TarError) as exc:
        print(f"beside: {exc}", file=sys.stderr)
        return 2
    if not results:
        print(f"beside: no per-request rows with replicas in {', '.join(skipped) or 'the inputs'} (run the bench with "
              "--per-request against an ingress with expose_replica_header)", file=sys.stderr)
        return 2
    for name, s in results.items():
        print(f"{name}: {s['requests']} requests, {s['busy_others_mean']} other replicas busy at a send on average")
        for k, g in s["by_busy_others"].items():
            print(f"  {k} other busy: n={g['n']} TTFT p50 {g['ttft_p50_ms']} ms, mean {g['ttft_mean_ms']}")
        for k, g in s["by_same_replica"].items():
            print(f"  {k} on its replica: n={g['n']} TTFT p50 {g['ttft_p50_ms']} ms, mean {g['ttft_mean_ms']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(["python -m benchmarks.routing_h2h.beside",
                                                                   *(argv if argv is not None else sys.argv[1:])]),
                                              "results": results, "skipped": skipped}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
