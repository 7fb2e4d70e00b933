"""Serving overhead of kvserve versus vLLM's own OpenAI server: same machine, same model, alternated runs.

Owns the serving-path GPU measurement. For each entry of ``--order`` (e.g. vllm_serve,kvserve,vllm_serve,
kvserve) it starts that system on the model of a kvserve config (``vllm serve`` gets the same model dir and
engine arguments, derived by ``deployments.engine.engine_args``), runs ``vllm bench serve`` (random 1024 in /
128 out, ignore-eos) at concurrency 1 and 64, reads where the time went from the servers' own Prometheus
metrics (kvserve: the ``kvserve_stage_*`` histograms and vLLM's engine histograms through Ray's metrics
agent; ``vllm serve``: vLLM's engine histograms), stops it and checks that nothing of it is left (listeners on
its ports, engine processes) before the next start. It starts and stops Ray (``ray stop`` ends every Ray on
the machine): run it on a machine of its own. kvserve runs the way the GPU configs are served:
``kvserve serve --address auto`` on a Ray started with a known metrics port and the fast-path environment
(HAProxy in front, tied to its proxy by ``kvserve haproxy-wrapper``).

Variants of kvserve patch the config's first application (``VARIANTS``) to measure one knob at a time; all
but ``kvserve_noauth`` run with API keys on, as a user exposing the server would.
The JSON keeps every run, the medians per system, and the ratios of ``kvserve`` to ``vllm_serve``:
``ttft_p50_delta_ms_c1``, ``throughput_ratio_c64``, ``ttft_p50_ratio_c64``, ``ttft_p90_ratio_c64``,
``itl_p50_ratio_c64`` (and the same per variant under ``variants``).

Usage (GPU machine, PYTHONPATH holding vllm + ray and the repo; the model dir prepared):
    python3 benchmarks/gpu/serving_overhead.py --config configs/gpu.yaml --order vllm_serve,kvserve \\
        --out $OUT/serving_overhead.json --git-commit $(git rev-parse HEAD)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import serverproc
from benchmarks.gpu.promtext import engine_means_ms, scrape, stage_means_ms
from deployments.engine import engine_args
from serve_app import settings
from serve_app.config import load_serve_config
from serve_app.kuberay.targets import merge_patch

#: kvserve variant -> patch of the first application's args ("model" patches go to the first model).
#: API keys on, as a user exposing the server runs it (every variant but kvserve_noauth).
_AUTH = {"auth": {"enabled": True}}
VARIANTS: dict[str, dict] = {
    "kvserve": {"args": _AUTH},
    "kvserve_noauth": {},  # configs/gpu.yaml as it is
    "kvserve_nomerge": {"args": _AUTH, "model": {"stream_merge_lag_ms": 0}},  # every engine step a chunk
    "kvserve_one_ingress": {"args": {**_AUTH, "ingress": {"deployment": {"num_replicas": 1}}}},
    "kvserve_round_robin": {"args": {**_AUTH, "routing": {"strategy": "round-robin"}}},
}
BENCH_KEY = "sk-serving-overhead"  # the one tenant's key of the variants with auth on (KVSERVE_API_KEYS=bench:<key>)
PORTS = (8000, 8001, 8080, 8404, 9101)  # kvserve HTTP, vllm serve, Ray metrics, HAProxy stats/metrics
KVSERVE_METRICS = "http://127.0.0.1:8080/metrics"
VLLM_METRICS = "http://127.0.0.1:8001/metrics"
KEEP = ("completed", "failed", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_ttft_ms",
        "median_tpot_ms", "median_itl_ms", "p90_itl_ms", "output_throughput", "request_throughput")


def vllm_cli_flags(args: dict) -> list[str]:
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


def write_variant(base_config: Path, name: str, work: Path) -> Path:
    doc = yaml.safe_load(base_config.read_text())
    patch = VARIANTS[name]
    args = merge_patch(doc["applications"][0]["args"], patch.get("args", {}))
    args["models"][0] = merge_patch(args["models"][0], patch.get("model", {}))
    doc["applications"][0]["args"] = args
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def leftovers() -> dict:
    """What still runs of an earlier server: listeners on PORTS, vLLM engine cores, HAProxy."""
    return serverproc.leftovers(PORTS)


def clean(log: list, kill: bool) -> None:
    """Record what an earlier server left (a server must leave nothing) and, with ``kill``, stop it."""
    found = leftovers()
    if found["listening"] or found["processes"]:
        log.append({"at": time.time(), **found})
    if kill and (found["listening"] or found["processes"]):
        log.append({"at": time.time(), **found})
        subprocess.run(["ray", "stop", "--force"], check=False, capture_output=True)
        for p in found["processes"]:
            subprocess.run(["kill", "-9", str(p["pid"])], check=False)
        time.sleep(3)


def bench(base: str, model: str, tokenizer: str, conc: int, n: int, work: Path, tag: str, args,
          api_key: str | None = None) -> dict:
    name = f"{tag}_c{conc}.json"
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "vllm",
           "--base-url", base, "--endpoint", "/v1/completions", "--model", model, "--tokenizer", tokenizer,
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--ignore-eos", "--max-concurrency", str(conc),
           "--num-prompts", str(n), "--num-warmups", str(min(conc, 8)), "--seed", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--save-result", "--result-dir", str(work), "--result-filename", name, "--disable-tqdm"]
    print("+", shlex.join(cmd), flush=True)
    env = {**os.environ, "OPENAI_API_KEY": api_key} if api_key else None  # vllm bench sends it as Bearer
    subprocess.run(cmd, check=True, timeout=args.bench_timeout, env=env)
    r = json.loads((work / name).read_text())
    return {k: r.get(k) for k in KEEP} | {"command": shlex.join(cmd)}


def run_system(system: str, run: int, cfg_path: Path, model, eargs: dict, work: Path, args, log: list) -> dict:
    tag = f"{system}_{run}"
    clean(log, args.kill_leftovers)
    env: dict[str, str] = {}
    if system == "vllm_serve":
        start = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", eargs["model"],
                 "--port", "8001", *vllm_cli_flags(eargs)]
        base, metrics_url = "http://127.0.0.1:8001", VLLM_METRICS
    else:
        from serve_app.haproxy_guard import write_wrapper

        env = {**settings.SERVE_FAST_PATH_ENV, "RAY_SERVE_HAPROXY_BINARY_PATH": str(write_wrapper()),
               "RAY_metrics_report_interval_ms": "1000", "KVSERVE_API_KEYS": f"bench:{BENCH_KEY}"}
        ray_start = ["ray", "start", "--head", "--metrics-export-port", "8080", "--disable-usage-stats"]
        subprocess.run(ray_start, check=True, env={**os.environ, **env}, capture_output=True, timeout=120)
        start = [sys.executable, "-m", "serve_app.cli", "serve", "--address", "auto", str(cfg_path)]
        base, metrics_url = "http://127.0.0.1:8000", KVSERVE_METRICS
    print(f"=== {tag}:", shlex.join(start), flush=True)
    proc = serverproc.start(start, env, work / f"{tag}_server.log", ROOT)
    res: dict = {"system": system, "run": run, "start_cmd": shlex.join(start),
                 "env": {k: v for k, v in env.items() if k != "KVSERVE_API_KEYS"}}
    key = BENCH_KEY if "auth" in VARIANTS.get(system, {}).get("args", {}) else None
    try:
        res["ready_s"] = round(serverproc.wait_serving(base + "/v1", model.id, args.start_timeout, proc, key), 1)
        for conc, n in ((1, args.prompts_c1), (64, args.prompts_c64)):
            before = scrape(metrics_url)
            res[f"c{conc}"] = bench(base, model.id, eargs["tokenizer"], conc, n, work, tag, args, key)
            time.sleep(3 if system != "vllm_serve" else 0)  # Ray's agent exports every second
            after = scrape(metrics_url)
            res[f"c{conc}"]["engine_ms"] = engine_means_ms(before, after)
            if system != "vllm_serve":
                res[f"c{conc}"]["stages_ms"] = stage_means_ms(before, after)
    except (subprocess.SubprocessError, RuntimeError, TimeoutError) as err:
        res["error"] = f"{type(err).__name__}: {err}"
    finally:
        t0 = time.time()
        serverproc.stop(proc)
        if system != "vllm_serve":  # the Ray this run started (`ray stop` ends every Ray on the machine)
            subprocess.run(["ray", "stop"], check=False, capture_output=True, timeout=120)
        res["stop_s"] = round(time.time() - t0, 1)
        time.sleep(2)
        res["left_after_stop"] = leftovers()
    return res


def _median(runs: list[dict], conc: str, key: str) -> float | None:
    vals = [r[conc][key] for r in runs if conc in r and r[conc].get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: list[dict]) -> dict:
    """Medians per system, and each kvserve system's ratios to vllm_serve."""
    systems = sorted({r["system"] for r in runs})
    med = {s: {f"{c}_{k}": _median([r for r in runs if r["system"] == s], c, k)
               for c in ("c1", "c64") for k in ("median_ttft_ms", "p90_ttft_ms", "output_throughput",
                                                 "median_itl_ms")} for s in systems}
    out: dict = {"medians": med, "runs_per_system": {s: sum(r["system"] == s for r in runs) for s in systems}}
    v = med.get("vllm_serve")
    if not v:
        return out
    ratios = {}
    for s in systems:
        k = med[s]
        if s == "vllm_serve" or None in k.values():
            continue
        ratios[s] = {
            "ttft_p50_delta_ms_c1": k["c1_median_ttft_ms"] - v["c1_median_ttft_ms"],
            "throughput_ratio_c64": k["c64_output_throughput"] / v["c64_output_throughput"],
            "ttft_p50_ratio_c64": k["c64_median_ttft_ms"] / v["c64_median_ttft_ms"],
            "ttft_p90_ratio_c64": k["c64_p90_ttft_ms"] / v["c64_p90_ttft_ms"],
            "itl_p50_ratio_c64": k["c64_median_itl_ms"] / v["c64_median_itl_ms"],
        }
    out["variants"] = ratios
    out.update(ratios.get("kvserve", {}))
    out["targets"] = {"ttft_p50_delta_ms_c1": "<= 3", "throughput_ratio_c64": ">= 0.98",
                      "ttft_p50_ratio_c64": "<= 1.05", "ttft_p90_ratio_c64": "<= 1.10", "itl_p50_ratio_c64": "<= 1.5"}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/gpu.yaml")
    p.add_argument("--out", required=True)
    p.add_argument("--order", default="vllm_serve,kvserve,vllm_serve,kvserve",
                   help=f"comma-separated systems, run in this order: vllm_serve and any of {sorted(VARIANTS)}")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompts-c1", type=int, default=30)
    p.add_argument("--prompts-c64", type=int, default=384)
    p.add_argument("--start-timeout", type=float, default=420)
    p.add_argument("--bench-timeout", type=float, default=300)
    p.add_argument("--merge", action="store_true", help="add these runs to those already in --out")
    p.add_argument("--git-commit", default="unknown", help="the commit of the code measured")
    p.add_argument("--work-dir", default="/tmp/kvserve-bench", help="raw bench JSON and server logs")
    p.add_argument("--kill-leftovers", action="store_true",
                   help="kill what an earlier server left before each start (a machine of its own: the GPU one)")
    args = p.parse_args()
    out, work = Path(args.out), Path(args.work_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    for system in args.order.split(","):
        if system != "vllm_serve" and system not in VARIANTS:
            p.error(f"unknown system {system!r}")
    _, apps = load_serve_config(ROOT / args.config)
    model = apps[0].models[0]
    eargs = engine_args(model, apps[0], None)
    results: dict = json.loads(out.read_text()) if args.merge and out.exists() else {"runs": [], "leftovers": []}
    results.update({"config": args.config, "model_dir": eargs["model"], "git_commit": args.git_commit,
                    "workload": f"vllm bench serve random {args.input_len} in / {args.output_len} out, ignore-eos"})
    for system in args.order.split(","):
        run = sum(r["system"] == system for r in results["runs"]) + 1
        cfg = ROOT / args.config if system == "vllm_serve" else write_variant(ROOT / args.config, system, work)
        results["runs"].append(run_system(system, run, cfg, model, eargs, work, args, results["leftovers"]))
        results.update(summarize(results["runs"]))
        out.write_text(json.dumps(results, indent=2) + "\n")  # keep what is done if a later step fails
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], check=False,
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        gpu = "none"
    results["machine"] = {"host": platform.node(), "gpu": gpu, "cpus": os.cpu_count(),
                          "python": platform.python_version()}
    results.setdefault("commands", []).append(shlex.join([sys.executable, *sys.argv]))
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
