"""CLI: ``python -m benchmarks.simulator --workload shared-prefix --replicas 16 --out sim.json``.

Runs the same request stream through each strategy and writes one JSON document with the command,
the engine model, the routing knobs and, per strategy, TTFT p50/p90/p99, output tok/s, cache-hit
rate, reasons and requests per replica. ``--routing KEY=VALUE`` overrides ``RoutingConfig`` fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from benchmarks.simulator import workloads
from benchmarks.simulator.engine import EngineModel, simulate
from serve_app.config.routing import RoutingConfig

DEFAULT_TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"


def _requests(args: argparse.Namespace, block_size: int) -> list[workloads.SimRequest]:
    common = {"block_size": block_size, "seed": args.seed}
    if args.workload == "shared-prefix":
        return workloads.shared_prefix(args.requests, args.rate, docs=args.docs, doc_tokens=args.doc_tokens, **common)
    if args.workload == "no-sharing":
        return workloads.no_sharing(args.requests, args.rate, **common)
    if args.workload == "multi-turn":
        return workloads.multi_turn(args.requests, args.rate, sessions=args.sessions, **common)
    return workloads.mooncake(args.trace, limit=args.requests, time_scale=args.time_scale, block_size=block_size,
                              max_prompt_tokens=args.max_prompt_tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.simulator", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["shared-prefix", "no-sharing", "multi-turn", "mooncake"], default="shared-prefix")
    ap.add_argument("--strategies", default="prefix-aware,kv-aware,least-loaded,round-robin")
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=20.0, help="requests/s (synthetic workloads)")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=4096)
    ap.add_argument("--sessions", type=int, default=32, help="multi-turn: concurrently open chat sessions")
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--time-scale", type=float, default=1.0, help="mooncake: multiply trace timestamps")
    ap.add_argument("--max-prompt-tokens", type=int, default=None)
    ap.add_argument("--prefill-tps", type=float, default=EngineModel().prefill_tokens_per_s)
    ap.add_argument("--decode-s-per-token", type=float, default=EngineModel().decode_s_per_token)
    ap.add_argument("--kv-blocks", type=int, default=None, help="per replica (default: 64k tokens)")
    ap.add_argument("--stats-period", type=float, default=EngineModel().stats_period_s, help="replica report period (s)")
    ap.add_argument("--block-size", type=int, default=None, help="default 16; 512 for mooncake")
    ap.add_argument("--routing", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    block_size = args.block_size or (512 if args.workload == "mooncake" else 16)
    engine = EngineModel(
        prefill_tokens_per_s=args.prefill_tps, decode_s_per_token=args.decode_s_per_token, block_size=block_size,
        kv_blocks=args.kv_blocks or 65536 // block_size, stats_period_s=args.stats_period,
    )
    overrides = dict(kv.split("=", 1) for kv in args.routing)
    requests = _requests(args, block_size)
    results = {}
    for strategy in args.strategies.split(","):
        routing = RoutingConfig(strategy=strategy, prefill_s_per_token=1.0 / engine.prefill_tokens_per_s, **overrides)
        t0 = time.perf_counter()
        res = simulate(requests, routing.knobs(), replicas=args.replicas, engine=engine, seed=args.seed)
        results[strategy] = {**res.summary(), "sim_wall_s": round(time.perf_counter() - t0, 2)}
    doc = {
        "command": "python -m benchmarks.simulator " + " ".join(argv if argv is not None else sys.argv[1:]),
        "workload": args.workload, "replicas": args.replicas, "requests": len(requests),
        "engine": dataclasses.asdict(engine), "routing_overrides": overrides, "results": results,
    }
    text = json.dumps(doc, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
