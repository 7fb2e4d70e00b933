"""The scale table: the calibrated simulator at 8-1024 replicas on docqa, multiturn and Mooncake.

Owns ``SIZES``, ``scenario`` (the workload and load of one size: rates and sharing grow with the
cluster), ``run_table`` and the CLI, which writes ``sim_scale.json``, ``sim_scale.md`` and PNG plots.

Scaling rules (per replica, so every size offers the same load per replica):
    docqa      one document per 2 replicas (at least 4), Poisson at the GPU run's r70 rate per replica
    multiturn  endless sessions, one open per replica, Poisson at the GPU run's r70 rate per replica
    mooncake   one trace copy (own user population) per 64 replicas, sped up to ~4 requests/s per replica
Each cell sends ``requests_per_replica`` x replicas requests, at most ``max_requests`` (simulation
time grows with replicas x requests: the policies score every replica on every request); the
first half warms the caches and only the second half is measured.
Ingress replicas: one per 64 engine replicas (at least one); kv-aware hears KV events 50 ms late.
"ingress CPU" is the router's decision time x offered requests/s per ingress (1.0 = one core busy
routing);
"event CPU" the time applying KV events per second per ingress: where either nears 1, one ingress
replica no longer keeps up at that size.
The "+tier" rows add the shared KV tier (object store, ``tier_gib`` per GPU node of 8 GPUs).

The workload arguments and per-replica rates come from a routing head-to-head JSON (``--routing``).

CLI: ``python -m benchmarks.simulator.scale --calibration benchmarks/results/sim_calibration.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from benchmarks.bench.result import git_commit, machine_info
from benchmarks.simulator import workloads
from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.load import Driver, LoadPlan
from benchmarks.simulator.routing_cells import sessions_for
from benchmarks.simulator.sim import ClusterSpec, simulate
from serve_app.config.routing import RoutingConfig
from serve_app.settings import mooncake_trace

SIZES = (8, 64, 256, 1024)
WORKLOADS = ("docqa", "multiturn", "mooncake")
SYSTEMS = {"round-robin": ("round-robin", False), "prefix-aware": ("prefix-aware", False),
           "kv-aware": ("kv-aware", False), "kv-aware+tier": ("kv-aware", True)}


def scenario(workload: str, replicas: int, settings: dict, rates: dict, engine: EngineModel, *, requests: int,
             gpu_replicas: int = 4, seed: int = 0) -> tuple[Driver, float]:
    """The load of ``workload`` at ``replicas`` (``requests`` sent); returns (driver, offered requests/s)."""
    bs = engine.block_size
    if workload == "mooncake":
        copies = max(1, replicas // 64)
        sessions = workloads.mooncake_sessions(mooncake_trace(), block_tokens=64, max_input_tokens=7000,
                                               max_output_tokens=256, time_scale=1.2 * replicas / copies,
                                               copies=copies, block_size=bs, seed=seed,
                                               limit=2 * requests // copies + 200)
        n = requests
        rate = n / max(sessions[min(n, len(sessions)) - 1].arrival_s, 1e-9)
        return Driver(iter(sessions), LoadPlan("trace", num_requests=n, seed=seed)), rate
    args = list(settings["workloads"][workload])
    rate = rates[workload]["r70"] / gpu_replicas * replicas
    if workload == "docqa":
        args[args.index("--docs") + 1] = str(max(4, replicas // 2))
        sessions = sessions_for("docqa", args, bs, seed)
        width = 16
    else:
        sessions = workloads.multiturn_sessions(sessions=0, turns=int(args[args.index("--turns") + 1]),
                                                system_words=512, user_words=(32, 96), output_len=128,
                                                block_size=bs, seed=seed)
        width = replicas
    plan = LoadPlan("rate", rate, num_requests=requests, width=width, seed=seed)
    return Driver(sessions, plan), rate


def run_cell(workload: str, system: str, replicas: int, engine: EngineModel, settings: dict, rates: dict, *,
             requests: int, tier_gib: float, gpu_hour_usd: float | None = None) -> dict:
    strategy, tier = SYSTEMS[system]
    driver, rate = scenario(workload, replicas, settings, rates, engine, requests=requests)
    ingresses = max(1, replicas // 64)
    gpus = math.ceil(replicas / engine.replicas_per_gpu)
    budget = int(tier_gib * 2**30 * max(1, gpus // 8) / (engine.kv_bytes_per_token * engine.block_size)) if tier else 0
    cluster = ClusterSpec(replicas, ingresses=ingresses, event_lag_s=0.05, tier_budget_blocks=budget,
                          measure_memory=True)
    t0 = time.perf_counter()
    res = simulate(driver, RoutingConfig(strategy=strategy).knobs(), cluster, engine, measure_from=requests // 2)
    kw = {"gpu_hour_usd": gpu_hour_usd} if gpu_hour_usd is not None else {}
    s = res.summary(per_replica=False, **kw)
    return {
        "workload": workload, "system": system, "replicas": replicas, "gpus": gpus, "ingresses": ingresses,
        "offered_rps": round(rate, 1), **{k: s[k] for k in (
            "requests", "ttft_p50_ms", "ttft_p99_ms", "cache_hit_rate", "tier_hit_rate", "output_tok_per_s",
            "requests_per_s", "router_decision_p50_us", "router_decision_p99_us", "index_bytes_per_ingress")},
        "ingress_cpu_fraction": round(s["router_decision_p50_us"] * 1e-6 * rate / ingresses, 3),
        "events_per_s_per_ingress": round(res.events_applied / max(ingresses, 1) / max(res.last_done, 1e-9), 1),
        "event_apply_us_per_event": s["event_apply_us_per_event"],
        "event_cpu_fraction": round(res.event_apply_s / max(ingresses, 1) / max(res.last_done, 1e-9), 3),
        "cost_per_1k_input_tokens_usd": s["cost"]["cost_per_1k_input_tokens_usd"],
        "cost_per_1k_output_tokens_usd": s["cost"]["cost_per_1k_output_tokens_usd"],
        "sim_wall_s": round(time.perf_counter() - t0, 1),
    }


def table_md(rows: list[dict]) -> str:
    head = ("| workload | replicas | system | TTFT p50 ms | p99 | hit | tier hit | out tok/s | decision p50 us | "
            "ingress CPU | index MiB/ingress | events/s/ingress | event CPU | $/1K out |")
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mib = (r["index_bytes_per_ingress"] or 0) / 2**20
        lines.append(f"| {r['workload']} | {r['replicas']} | {r['system']} | {r['ttft_p50_ms']:.0f} | "
                     f"{r['ttft_p99_ms']:.0f} | "
                     f"{r['cache_hit_rate']:.2f} | {r['tier_hit_rate']:.2f} | {r['output_tok_per_s']:.0f} | "
                     f"{r['router_decision_p50_us']:.0f} | {r['ingress_cpu_fraction']:.2f} | {mib:.1f} | "
                     f"{r['events_per_s_per_ingress']:.0f} | {r['event_cpu_fraction']:.2f} | "
                     f"{r['cost_per_1k_output_tokens_usd']:.5f} |")
    return "\n".join(lines)


def plot(rows: list[dict], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, label, fname in (("ttft_p50_ms", "TTFT p50 (ms)", "sim_scale_ttft.png"),
                                 ("cache_hit_rate", "prefix cache hit rate", "sim_scale_hit.png"),
                                 ("router_decision_p50_us", "router decision p50 (us)", "sim_scale_decision.png")):
        fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(4 * len(WORKLOADS), 3.2), sharex=True)
        for ax, wl in zip(axes, WORKLOADS):
            for system in SYSTEMS:
                pts = sorted((r["replicas"], r[metric]) for r in rows if r["workload"] == wl and r["system"] == system)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=system)
            ax.set_xscale("log", base=2)
            ax.set_title(wl)
            ax.set_xlabel("replicas")
        axes[0].set_ylabel(label)
        axes[-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(str(out_dir / fname))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.simulator.scale", description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", default="benchmarks/results/sim_calibration.json")
    ap.add_argument("--routing", default="benchmarks/results/routing_h100.json",
                    help="routing head-to-head JSON whose workload arguments and r70 rates per replica "
                         "the table offers")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--requests-per-replica", type=int, default=24)
    ap.add_argument("--max-requests", type=int, default=2400, help="cap on requests per cell (simulation time)")
    ap.add_argument("--tier-gib", type=float, default=64.0, help="KV tier budget per 8-GPU node")
    ap.add_argument("--gpu-hour-usd", type=float, default=None)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--plot-dir", default="docs/img")
    ap.add_argument("--merge", nargs="+", default=None, metavar="SIM_SCALE_JSON",
                    help="no simulation: combine the rows of these sim_scale.json files (runs split by workload)")
    args = ap.parse_args(argv)
    if args.merge:
        docs = [json.loads(Path(p).read_text()) for p in args.merge]
        return _write(args, docs[0]["engine"], [r for d in docs for r in d["rows"]],
                      [c for d in docs for c in d["commands"]])
    cal = json.loads(Path(args.calibration).read_text())
    routing = json.loads(Path(args.routing).read_text())
    engine = EngineModel.from_dict(cal["engine"])
    rows = []
    for wl in args.workloads.split(","):
        for n in map(int, args.sizes.split(",")):
            for system in args.systems.split(","):
                row = run_cell(wl, system, n, engine, routing["scale_settings"], routing["rates"],
                               requests=min(args.requests_per_replica * n, args.max_requests), tier_gib=args.tier_gib,
                               gpu_hour_usd=args.gpu_hour_usd)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    return _write(args, engine.to_dict(), rows, ["python -m benchmarks.simulator.scale " + " ".join(
        argv if argv is not None else sys.argv[1:])])


def _write(args: argparse.Namespace, engine: dict, rows: list[dict], commands: list[str]) -> int:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = {w: i for i, w in enumerate(WORKLOADS)}
    rows = sorted(rows, key=lambda r: (order.get(r["workload"], 9), r["replicas"], list(SYSTEMS).index(r["system"])))
    for r in rows:  # derived from the row's own fields, so rows merged from several runs agree
        r["ingress_cpu_fraction"] = round(r["router_decision_p50_us"] * 1e-6 * r["offered_rps"] / r["ingresses"], 3)
    doc = {"schema": "kvserve.sim_scale/1", "commands": commands, "machine": machine_info(), "git_commit": git_commit(),
           "calibration": args.calibration, "routing": args.routing,
           "engine": engine, "rows": rows}
    (out / "sim_scale.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "sim_scale.md").write_text(table_md(rows) + "\n")
    Path(args.plot_dir).mkdir(parents=True, exist_ok=True)
    plot(rows, Path(args.plot_dir))
    print(table_md(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
