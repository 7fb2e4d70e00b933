"""Serving overhead of kvserve versus vLLM's own OpenAI server, same machine, same load, one run.

Owns the issue-2 GPU measurement: starts ``vllm serve`` on the model of a kvserve config (same model
dir, same engine arguments, derived by ``deployments.engine.engine_args``), runs the load at
concurrency 1 and 64 with ``vllm bench serve`` (random 1024 in / 128 out, ignore-eos), stops it,
then does the same through ``serve run CONFIG``, and writes one JSON with both systems' TTFT p50 and
output tok/s plus ``ttft_p50_delta_ms_c1``, ``throughput_ratio_c64`` and ``ttft_p50_ratio_c64``.

Usage (GPU machine, PYTHONPATH holding vllm + ray):
    python3 benchmarks/gpu/serving_overhead.py --config configs/gpu.yaml --out $OUT/serving_overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import serverproc
from deployments.engine import engine_args
from serve_app import settings
from serve_app.config import load_serve_config

#: kvserve variants: the Serve environment each runs under. "kvserve" is the one we ship (configs +
#: kuberay/ set the same variables); the others are measured to justify that choice.
VARIANTS = {
    "kvserve": dict(settings.SERVE_FAST_PATH_ENV),
    "kvserve_python_proxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "kvserve_serve_defaults": {},
}


def _vllm_cli_flags(args: dict) -> list[str]:
    flags = []
    for key, value in args.items():
        if key in ("model", "disable_log_stats"):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                flags.append(flag)
            elif key == "enable_prefix_caching":
                flags.append("--no-enable-prefix-caching")
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def _bench(base: str, model: str, tokenizer: str, conc: int, n: int, out_dir: Path, tag: str, args) -> dict:
    name = f"{tag}_c{conc}.json"
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "vllm",
           "--base-url", base, "--endpoint", "/v1/completions", "--model", model, "--tokenizer", tokenizer,
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--ignore-eos", "--max-concurrency", str(conc),
           "--num-prompts", str(n), "--num-warmups", str(min(conc, 8)), "--seed", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--save-result", "--result-dir", str(out_dir), "--result-filename", name, "--disable-tqdm"]
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, timeout=args.bench_timeout)
    r = json.loads((out_dir / name).read_text())
    keep = ("completed", "failed", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_ttft_ms",
            "median_tpot_ms", "median_itl_ms", "output_throughput", "request_throughput")
    return {k: r.get(k) for k in keep} | {"command": shlex.join(cmd)}


def _run_system(tag: str, start_cmd: list[str], env: dict, base: str, model: str, tokenizer: str,
                out_dir: Path, args) -> dict:
    print("+", shlex.join(start_cmd), flush=True)
    proc = serverproc.start(start_cmd, env, out_dir / f"{tag}_server.log", ROOT)
    try:
        ready_s = serverproc.wait_ready(base + "/v1/models", args.start_timeout, proc)
        res = {"start_cmd": shlex.join(start_cmd), "env": env, "ready_s": round(ready_s, 1)}
        for conc, n in ((1, args.prompts_c1), (64, args.prompts_c64)):
            res[f"c{conc}"] = _bench(base, model, tokenizer, conc, n, out_dir, tag, args)
        return res
    finally:
        serverproc.stop(proc)
        if tag.startswith("kvserve"):
            subprocess.run(["ray", "stop", "--force"], check=False, capture_output=True)
        time.sleep(5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/gpu.yaml")
    p.add_argument("--out", required=True)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompts-c1", type=int, default=30)
    p.add_argument("--prompts-c64", type=int, default=384)
    p.add_argument("--start-timeout", type=float, default=420)
    p.add_argument("--bench-timeout", type=float, default=300)
    p.add_argument("--systems", default="vllm_serve,kvserve",
                   help=f"comma-separated: vllm_serve and any of {sorted(VARIANTS)}")
    p.add_argument("--merge", action="store_true", help="add to the results already in --out")
    p.add_argument("--work-dir", default="/tmp/kvserve-bench", help="where raw results and server logs go")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.work_dir)  # raw bench JSON + server logs (only the summary goes to --out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, apps = load_serve_config(ROOT / args.config)
    app = apps[0]
    model = app.models[0]
    eargs = engine_args(model, app, None)
    tokenizer = eargs["tokenizer"]
    results: dict = json.loads(out.read_text()) if args.merge and out.exists() else {}
    results.update({"config": args.config, "model_dir": eargs["model"],
                    "workload": f"vllm bench serve random {args.input_len} in / {args.output_len} out, ignore-eos"})
    for system in args.systems.split(","):
        if system == "vllm_serve":
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", eargs["model"],
                   "--port", "8001", *_vllm_cli_flags(eargs)]
            results[system] = _run_system("vllm", cmd, {}, "http://127.0.0.1:8001", model.id, tokenizer,
                                          out_dir, args)
        elif system in VARIANTS:
            cmd = ["serve", "run", str(ROOT / args.config)]
            try:
                results[system] = _run_system(system, cmd, VARIANTS[system], "http://127.0.0.1:8000", model.id,
                                              tokenizer, out_dir, args)
            except (subprocess.SubprocessError, RuntimeError, TimeoutError) as err:
                results[system] = {"error": f"{type(err).__name__}: {err}", "env": VARIANTS[system]}
        else:
            p.error(f"unknown system {system!r}")
        out.write_text(json.dumps(results, indent=2) + "\n")  # keep what is done if a later step fails
    if "vllm_serve" in results and "kvserve" in results:
        v, k = results["vllm_serve"], results["kvserve"]
        results["ttft_p50_delta_ms_c1"] = k["c1"]["median_ttft_ms"] - v["c1"]["median_ttft_ms"]
        results["throughput_ratio_c64"] = k["c64"]["output_throughput"] / v["c64"]["output_throughput"]
        results["ttft_p50_ratio_c64"] = k["c64"]["median_ttft_ms"] / v["c64"]["median_ttft_ms"]
        results["targets"] = {"ttft_p50_delta_ms_c1": "<= 3", "throughput_ratio_c64": ">= 0.98",
                              "ttft_p50_ratio_c64": "<= 1.05"}
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], check=False, capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        gpu = "none"
    results["machine"] = {"host": platform.node(), "gpu": gpu, "python": platform.python_version()}
    results.setdefault("commands", []).append(shlex.join([sys.executable, *sys.argv]))
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
