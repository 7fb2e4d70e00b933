"""The routing head-to-head's fake-engine cells in the simulator: the serving path and the routers without a GPU.

Owns ``step_engine`` (a calibrated ``EngineModel`` with its GPU parts replaced by the paced fake engine's clock,
``benchmarks.step_engine``: one token per stream every step, a prompt costs nothing, no prefix cache to wait
for, no co-located engine slowing another) and ``main`` (``python -m benchmarks.simulator.step_cells``: every
cell of a ``routing_h2h.run --step-engine`` result beside its simulation, over seeds, and per workload each
system's TTFT p50 over kv-aware's, measured and simulated). Those cells isolate what is left once the engine is
out: the ingress, Serve's dispatch, the replicas' loops and the routers' decisions; a twin that misses them there
misses them on the GPU too, and this check runs in seconds.

With ``--gpu`` the same comparison takes a GPU result (no fake engine) and the calibrated engine as it is: a run
the calibration did not see (a repeat, another order of cells, another GPU of the same kind) beside its simulation,
with each seed's TTFT p50 and the requests per replica, where a wave of sessions on one replica shows. ``--beside``
adds each cell's twin TTFTs and TPOTs grouped by the requests in flight and the other replicas busy at each send
(``benchmarks/routing_h2h/beside.py``), to set beside the same grouping of a ``--per-request`` GPU run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from benchmarks.bench.result import git_commit, machine_info
from benchmarks.routing_h2h.beside import beside as beside_rows
from benchmarks.routing_h2h.beside import summarise
from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.routing_cells import gpu_cells, simulate_cell, with_split_load

KEYS = ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "output_tok_per_s")
FREE_PREFILL_TOKENS_PER_S = 1e12  # the fake engine's prompt costs nothing (prefill_ms_per_1k 0)


def step_engine(engine: EngineModel, step_ms: float) -> EngineModel:
    """``engine``'s serving path (ingress, replica front end, client, tree calls) around the fake engine's clock."""
    if step_ms <= 0:
        raise ValueError(f"step_ms must be > 0, got {step_ms}")
    return engine.with_(step_s=step_ms / 1e3, prefill_tokens_per_s=FREE_PREFILL_TOKENS_PER_S, prefill_attn_s=0.0,
                        prefill_step_s=0.0, decode_s_per_seq=0.0, decode_s_per_ktok=0.0, gpu_contention=0.0,
                        prefill_contention=0.0,
                        async_scheduling=False, kv_admission=False, kv_blocks=1 << 20)


def compare(doc: dict, engine: EngineModel, seeds: int = 2, gpu: bool = False, split_load: bool = False,
            beside: bool = False) -> dict:
    """Every modelled cell of the fake-engine result ``doc`` against the simulator (medians over ``seeds``); with
    ``gpu``, of a GPU result against ``engine`` as it is; with ``split_load``, each cell replaying its bench
    processes (``routing_cells.with_split_load``); with ``beside``, each cell's seed-0 TTFTs and TPOTs grouped by the
    requests in flight and the other replicas busy at each send (``sim_beside``: ``routing_h2h.beside``, as a
    ``--per-request`` GPU run's are)."""
    step_ms = doc.get("step_engine_ms")
    if gpu and step_ms:
        raise ValueError(f"a --step-engine result (step_engine_ms {step_ms}): compare it without --gpu")
    if not gpu and not step_ms:
        raise ValueError("not a --step-engine result: its step_engine_ms is missing (--gpu compares a GPU result)")
    eng = engine if gpu else step_engine(engine, float(step_ms))
    rows = []
    cells = gpu_cells(doc)
    for cell in with_split_load(cells) if split_load else cells:
        replicas = (cell.measured.get("evidence") or {}).get("replicas")
        if not replicas:
            raise ValueError(f"{cell.name} {cell.workload}:{cell.load} records no replica count (evidence.replicas)")
        sims = [simulate_cell(cell, eng, doc["scale_settings"], int(replicas), seed=s, per_replica=True,
                              keep_requests=beside and s == 0) for s in range(seeds)]
        row = {"system": cell.name, "strategy": cell.strategy, "workload": cell.workload, "load": cell.load}
        for key in KEYS:
            row[f"measured_{key}"] = round(cell.measured[key], 1)
            row[f"sim_{key}"] = round(statistics.median(s[key] for s in sims), 1)
        row["ttft_p50_error"] = round(row["sim_ttft_p50_ms"] / row["measured_ttft_p50_ms"] - 1, 3)
        row["sim_ttft_p50_ms_by_seed"] = [round(s["ttft_p50_ms"], 1) for s in sims]
        if "cache_hit_rate" in cell.measured:
            row["measured_cache_hit_rate"] = round(cell.measured["cache_hit_rate"], 3)
        row["sim_cache_hit_rate_by_seed"] = [round(s["cache_hit_rate"], 3) for s in sims]
        # requests per replica, busiest first: a wave of sessions on one replica shows here
        row["measured_requests_by_replica"] = sorted(
            ((cell.measured.get("evidence") or {}).get("requests_by_replica") or {}).values(), reverse=True)
        row["sim_requests_by_replica"] = [sorted(s["requests_per_replica"].values(), reverse=True) for s in sims]
        if beside:
            row["sim_beside"] = summarise(beside_rows(sims[0].pop("requests")))
        rows.append(row)
    ratios = []
    for r in rows:
        base = next((b for b in rows if b["workload"] == r["workload"] and b["load"] == r["load"]
                     and b["system"] == "kv-aware"), None)
        if base and r is not base:
            ratios.append({"workload": r["workload"], "load": r["load"], "system": r["system"],
                           "measured_ttft_p50_vs_kv_aware": round(r["measured_ttft_p50_ms"]
                                                                  / base["measured_ttft_p50_ms"], 3),
                           "sim_ttft_p50_vs_kv_aware": round(r["sim_ttft_p50_ms"] / base["sim_ttft_p50_ms"], 3)})
    return {"step_engine_ms": step_ms, "engine": eng.to_dict(), "cells": rows, "ratios": ratios}


def table(rows: list[dict]) -> str:
    out = [("| system | workload | load | TTFT p50 ms measured | sim | error | p90 | sim | p99 | sim | tok/s | sim | "
            "requests per replica measured | sim (seed 0) | sim TTFT p50 by seed |"),
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        m = [r[f"{side}_{k}"] for k in KEYS for side in ("measured", "sim")]
        out.append(f"| {r['system']} | {r['workload']} | {r['load']} | {m[0]:.1f} | {m[1]:.1f} | "
                   f"{r['ttft_p50_error']:+.0%} | {m[2]:.0f} | {m[3]:.0f} | {m[4]:.0f} | {m[5]:.0f} | {m[6]:.0f} | "
                   f"{m[7]:.0f} | {'/'.join(map(str, r['measured_requests_by_replica']))} | "
                   f"{'/'.join(map(str, r['sim_requests_by_replica'][0]))} | "
                   f"{' / '.join(f'{x:.0f}' for x in r['sim_ttft_p50_ms_by_seed'])} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.simulator.step_cells", description=__doc__.splitlines()[0])
    ap.add_argument("--routing", required=True, help="a routing_h2h.run --step-engine result JSON (with --gpu: a GPU "
                    "result)")
    ap.add_argument("--gpu", action="store_true", help="--routing is a GPU result: simulate it on --engine as it is")
    ap.add_argument("--engine", required=True, help="a calibration JSON (its routing.engine) or an EngineModel JSON")
    ap.add_argument("--seeds", type=int, default=2, help="simulations per cell (their median is reported)")
    ap.add_argument("--split-load", action="store_true",
                    help="each cell replays its bench processes (shares, session shards, arrival streams)")
    ap.add_argument("--client-sharing", choices=("ps", "fifo"),
                    help="the engine's client cores served this way instead (EngineModel.client_sharing)")
    ap.add_argument("--beside", action="store_true",
                    help="also each cell's seed-0 TTFT and TPOT p50 by the requests in flight and the other replicas "
                         "busy at each send (sim_beside)")
    ap.add_argument("--out", help="write the comparison JSON here")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    try:
        doc = json.loads(Path(args.routing).read_text())
        cal = json.loads(Path(args.engine).read_text())
        engine = EngineModel(**(cal.get("routing", {}).get("engine") or cal.get("engine") or cal))
        if args.client_sharing:
            engine = engine.with_(client_sharing=args.client_sharing)
        result = compare(doc, engine, args.seeds, gpu=args.gpu, split_load=args.split_load, beside=args.beside)
    except (OSError, ValueError, TypeError) as exc:
        print(f"step_cells: {exc}", file=sys.stderr)
        return 2
    result = {"schema": "kvserve.sim_step_cells/1",
              "command": shlex.join(["python", "-m", "benchmarks.simulator.step_cells",
                                     *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_info(), "git_commit": git_commit(),
              "sources": {"routing": args.routing, "routing_git_commit": (doc.get("git_commits") or [None])[-1],
                          "engine": args.engine},
              **result}
    print(table(result["cells"]))
    for r in result["ratios"]:
        print(f"{r['workload']}/{r['load']} {r['system']}: TTFT p50 over kv-aware's "
              f"{r['measured_ttft_p50_vs_kv_aware']} measured, {r['sim_ttft_p50_vs_kv_aware']} simulated")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
