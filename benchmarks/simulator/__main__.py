"""CLI: ``python -m benchmarks.simulator --workload docqa --replicas 16 --rate 40 --out sim.json``.

Runs the same load through each strategy and writes one JSON document with the command, the engine
model, the cluster and, per strategy, TTFT p50/p90/p95/p99, output tok/s, cache-hit rates (GPU and
tier), router decision time, cost per 1K tokens, reasons and requests per replica.

Workloads: ``docqa`` and ``multiturn`` are ``kvserve bench``'s (closed loop with ``--concurrency``
or Poisson with ``--rate``); ``shared-prefix``, ``no-sharing``, ``multi-turn`` and ``mooncake`` are
fixed-arrival streams (``--rate``, or the trace's timestamps). ``--engine`` loads a calibrated
engine model (``sim_calibration.json``, its routing fit's with ``--routing-engine``, or a bare
EngineModel JSON object); explicit engine flags override it. ``--routing KEY=VALUE`` overrides
``RoutingConfig`` fields. ``ray-prefix-cache-affinity`` in ``--strategies`` runs the twin of Ray's
router (``ray_twin.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.bench.cost import DEFAULT_GPU_HOUR_USD
from benchmarks.bench.result import git_commit, machine_info
from benchmarks.simulator import workloads
from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.load import Driver, LoadPlan
from benchmarks.simulator.sim import Autoscale, ClusterSpec, simulate, strategy_knobs
from serve_app import settings

FIXED = ("shared-prefix", "no-sharing", "multi-turn", "mooncake")


def _driver(args: argparse.Namespace, block_size: int) -> Driver:
    common = {"block_size": block_size, "seed": args.seed}
    if args.workload in FIXED:
        if args.workload == "shared-prefix":
            reqs = workloads.shared_prefix(args.requests, args.rate, docs=args.docs, doc_tokens=args.doc_tokens,
                                           **common)
        elif args.workload == "no-sharing":
            reqs = workloads.no_sharing(args.requests, args.rate, **common)
        elif args.workload == "multi-turn":
            reqs = workloads.multi_turn(args.requests, args.rate, sessions=args.sessions, **common)
        else:
            reqs = workloads.mooncake(args.trace, limit=args.requests, time_scale=args.time_scale,
                                      block_size=block_size, max_prompt_tokens=args.max_prompt_tokens)
        return Driver(iter(workloads.trace_sessions(reqs)), LoadPlan("trace", seed=args.seed))
    if args.workload == "docqa":
        sessions = workloads.docqa_sessions(docs=args.docs, doc_tokens=(args.doc_tokens // 2, args.doc_tokens),
                                            **common)
    else:
        sessions = workloads.multiturn_sessions(sessions=0, sticky=args.sticky_sessions, **common)
    if args.concurrency:
        plan = LoadPlan("concurrency", args.concurrency, num_requests=args.requests, seed=args.seed)
    else:
        plan = LoadPlan("rate", args.rate, num_requests=args.requests, seed=args.seed)
    return Driver(sessions, plan)


def _engine(args: argparse.Namespace) -> EngineModel:
    base = EngineModel()
    if args.engine:
        doc = json.loads(Path(args.engine).read_text())
        if args.routing_engine and "routing" not in doc:
            raise SystemExit(f"--routing-engine: {args.engine} has no routing fit (calibrate --routing)")
        base = EngineModel.from_dict(doc["routing"]["engine"] if args.routing_engine else doc.get("engine", doc))
    changes = {k: v for k, v in (("prefill_tokens_per_s", args.prefill_tps),
                                 ("decode_s_per_token", args.decode_s_per_token),
                                 ("kv_blocks", args.kv_blocks), ("stats_period_s", args.stats_period)) if v is not None}
    block_size = args.block_size or (512 if args.workload == "mooncake" else base.block_size)
    if block_size != base.block_size:
        changes.setdefault("kv_blocks", base.kv_blocks * base.block_size // block_size)
    return base.with_(block_size=block_size, **changes)


def _cluster(args: argparse.Namespace, engine: EngineModel) -> ClusterSpec:
    failures = tuple((float(t), int(i)) for i, t in (f.split("@") for f in args.fail))
    autoscale = None
    if args.autoscale:
        lo, hi, target = args.autoscale.split(":")
        autoscale = Autoscale(int(lo), int(hi), float(target), start_s=args.replica_start_s)
    budget = int(args.tier_gib * 2**30 / (engine.kv_bytes_per_token * engine.block_size)) if args.tier_gib else 0
    return ClusterSpec(args.replicas, ingresses=args.ingresses, event_lag_s=args.event_lag, tier_budget_blocks=budget,
                       failures=failures, autoscale=autoscale, measure_memory=args.measure_memory)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.simulator", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["docqa", "multiturn", *FIXED], default="shared-prefix")
    ap.add_argument("--strategies", default="prefix-aware,kv-aware,least-loaded,round-robin",
                    help="comma-separated; kvserve's strategies and ray-prefix-cache-affinity (Ray's router's twin)")
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=20.0, help="requests/s (open loop)")
    ap.add_argument("--concurrency", type=int, default=None, help="docqa/multiturn: closed loop instead of --rate")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=4096)
    ap.add_argument("--sessions", type=int, default=32, help="multi-turn: concurrently open chat sessions")
    ap.add_argument("--sticky-sessions", action="store_true", help="multiturn: send the session key (x-session-id)")
    ap.add_argument("--trace", default=str(settings.mooncake_trace()),
                    help="mooncake: trace JSONL (default from KVSERVE_MOONCAKE_TRACE: %(default)s)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="mooncake: multiply trace timestamps")
    ap.add_argument("--max-prompt-tokens", type=int, default=None)
    ap.add_argument("--engine", default=None, help="calibrated engine JSON (sim_calibration.json)")
    ap.add_argument("--routing-engine", action="store_true",
                    help="--engine is a calibration: take its routing fit's engine (routing.engine: four replicas "
                         "sharing a GPU, their KV blocks) instead of its serving engine")
    ap.add_argument("--prefill-tps", type=float, default=None)
    ap.add_argument("--decode-s-per-token", type=float, default=None)
    ap.add_argument("--kv-blocks", type=int, default=None, help="per replica")
    ap.add_argument("--stats-period", type=float, default=None, help="replica report period (s)")
    ap.add_argument("--block-size", type=int, default=None, help="default 16; 512 for mooncake")
    ap.add_argument("--ingresses", type=int, default=1, help="ingress replicas, each with its own router state")
    ap.add_argument("--event-lag", type=float, default=0.0, help="seconds before a KV event reaches the ingresses")
    ap.add_argument("--tier-gib", type=float, default=0.0, help="shared KV tier budget (0: no tier)")
    ap.add_argument("--fail", action="append", default=[], metavar="REPLICA@SECONDS", help="kill a replica")
    ap.add_argument("--autoscale", default=None, metavar="MIN:MAX:TARGET_ONGOING")
    ap.add_argument("--replica-start-s", type=float, default=60.0, help="autoscaling: time for a new replica")
    ap.add_argument("--measure-memory", action="store_true", help="report the router index bytes per ingress")
    ap.add_argument("--gpu-hour-usd", type=float, default=DEFAULT_GPU_HOUR_USD)
    ap.add_argument("--routing", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    engine = _engine(args)
    cluster = _cluster(args, engine)
    overrides = dict(kv.split("=", 1) for kv in args.routing)
    results = {}
    for strategy in args.strategies.split(","):
        knobs = strategy_knobs(strategy, prefill_s_per_token=1.0 / engine.prefill_tokens_per_s, **overrides)
        t0 = time.perf_counter()
        res = simulate(_driver(args, engine.block_size), knobs, cluster, engine, seed=args.seed)
        results[strategy] = {**res.summary(gpu_hour_usd=args.gpu_hour_usd),
                             "sim_wall_s": round(time.perf_counter() - t0, 2)}
    doc = {
        "command": "python -m benchmarks.simulator " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(), "git_commit": git_commit(),
        "workload": args.workload, "replicas": args.replicas, "requests": args.requests,
        "engine": engine.to_dict(), "cluster": {"ingresses": cluster.ingresses, "event_lag_s": cluster.event_lag_s,
                                                "tier_budget_blocks": cluster.tier_budget_blocks,
                                                "failures": cluster.failures, "autoscale": args.autoscale},
        "routing_overrides": overrides, "results": results,
    }
    text = json.dumps(doc, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
