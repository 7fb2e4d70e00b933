"""How many streamed tokens per second one ingress replica sustains, and the CPU it spends per token and request.

Owns the measurement of the ingress's capacity over the real request path with no engine: HTTP through HAProxy to
the ingress replicas' own servers (as ``kvserve serve --fast-path``, the GPU runs and the kuberay pods have it; Serve's
Python proxy with ``--python-proxy``),
``deployments.ingress`` (built by ``serve_app.builder.build_app``: chat template, tokenization, block hashing,
admission), routing by ``deployments.request_router.KVServeRouter``, the handle stream from the real
``VLLMReplica`` and the SSE formatting of ``deployments.generation``. The replicas run
``benchmarks.step_engine:StepClockEngine`` (one token per active stream every ``--step-ms``), so everything but
the engine is the production code. Tokenization uses the SmolLM2 model under ``KVSERVE_MODEL_DIR``.

A closed loop of streaming chat requests (``--prompt-tokens`` of filler words, ``--output-len`` tokens with
``ignore_eos``) runs at each ``--concurrency`` for ``--warmup-s`` + ``--duration-s``; in the window it reports
output tokens/s, requests/s, the client's TTFT p50/p90, and the CPU seconds of each process (ingress, fake
replicas, proxy, controller, the rest of Ray, this client) per 1,000 streamed tokens and per request, read from
``/proc`` through psutil, the replicas' step pacing, the ingress's request-path stages (p50 and mean from the node's
metrics, with the route wait inside dispatch) and the worst event-loop lag and busy share at the level's end. The
ingress's merge triggers and replica count can be set for A/B runs (``--ingress-merge-lag-ms``,
``--ingress-merge-busy``, ``--ingress-replicas``; ``benchmarks/results/ingress_merge_cpu.json``). On a small machine
the client and the replicas compete with the ingress for the cores, so the ingress's ceiling is derived, not
observed: 1 core / its CPU per token.
With several ``--output-len`` values the ingress's CPU (and the proxy's, HAProxy's and replicas') is also split
into a per-request and a per-token part (``benchmarks.ingress_figures.cost_fit``). ``--profile-s`` then samples the
ingress's stacks at the highest concurrency (a run of its own: profiling perturbs the figures) with
``benchmarks.stack_sampler`` and lists its hottest functions and the CPU of each of its threads. That sampler
runs when it gets the GIL, so it over-counts frames that hand the GIL back (Ray's metric recording: 21% of its
self samples on the HAProxy path against ~2.5% in a py-spy record of the same load); the thread CPU is exact.

With ``--python-proxy`` requests go through Serve's Python proxy (its ``ProxyActor``) as they did before
``kvserve serve --fast-path`` existed: the ingress then also streams every chunk back to the proxy as a Ray
generator item.

kv-aware routing here has no KV events (the fake engine publishes none): the router's approximate index only.

    flock /tmp/kvserve-ray.lock python benchmarks/ingress_capacity.py --replicas 2 --concurrency 16,64,128 \
        --output-len 128,32 --warmup-s 4 --duration-s 15 --profile-s 10 \
        --out benchmarks/results/ingress_capacity_cpu_haproxy.json

(``ingress_capacity_cpu.json`` is the same through Serve's Python proxy, the path of its time.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ingress_figures import cost_fit, cpu_by_role, fold_stacks, pacing, role_of, window_stats
from benchmarks.routing_h2h.evidence import (
    ROUTE_MS,
    SERVER_ENV,
    VIEW_GAUGES,
    fetch,
    histogram,
    node_metrics_url,
    stages,
    sums,
)
from benchmarks.stack_sampler import HOOK_ENV

MODEL = "smollm2"


def app_args(args: argparse.Namespace, counters_dir: str) -> dict:
    """configs/cpu.yaml's app with the step-clock engine, ``--replicas`` replicas and queues that never refuse."""
    import yaml

    doc = yaml.safe_load((ROOT / "configs/cpu.yaml").read_text())["applications"][0]["args"]
    model = doc["models"][0]
    model.pop("env", None)
    model["engine_class"] = "benchmarks.step_engine:StepClockEngine"
    model["engine_kwargs"] = {"step_ms": args.step_ms, "counters_dir": counters_dir}
    model["deployment"].update(num_replicas=args.replicas, max_ongoing_requests=1024, max_queued_requests=1024)
    doc["ingress"]["deployment"].update(num_replicas=args.ingress_replicas, max_ongoing_requests=4096,
                                        max_queued_requests=4096)
    if args.ingress_merge_lag_ms is not None:
        doc["ingress"]["stream_merge_lag_ms"] = args.ingress_merge_lag_ms
    if args.ingress_merge_busy is not None:
        doc["ingress"]["stream_merge_busy"] = args.ingress_merge_busy
    doc["routing"] = {"strategy": args.strategy}
    if args.profile_s > 0:  # the ingress gets the stack sampler (idle until the profile run)
        env = {**HOOK_ENV, "KVSERVE_STACK_SAMPLE_DIR": str(Path(counters_dir).parent / "samples")}
        doc["ingress"]["deployment"]["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    return doc


@contextlib.contextmanager
def served_app(app: dict) -> Iterator[int]:
    """``app`` (an application's ``args``) deployed on a Ray and Serve of this process's own, HTTP on a free local
    port (yielded); both are shut down when the block ends. The Serve switches come from the environment."""
    import ray
    from ray import serve

    from serve_app.builder import build_app
    from serve_app.config import load_app_config

    port = _free_port()
    os.environ.update(SERVER_ENV)  # Ray's agent exports metrics every second, so a level's scrapes see all of it
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(load_app_config(app)), name="kvserve", route_prefix="/", blocking=False)
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def scrape(url: str | None) -> dict:
    """One scrape of the node's metrics (empty when there is no URL or it fails: the level's figures stand alone)."""
    if not url:
        return {}
    try:
        return fetch(url)
    except Exception:  # noqa: BLE001 - the stages are extra evidence, not the measurement
        return {}


def stage_figures(before: dict, after: dict) -> dict:
    """The ingress's request-path stages (p50 and mean, ms) over a level, and at its end the worst event-loop lag (ms)
    of the ingress and the replicas and the ingress's busiest loop share."""
    out: dict = {"stages_ms": {k: {"p50": v["p50"], "mean": v["mean"]} for k, v in stages(before, after).items()}}
    route = histogram(before, after, ROUTE_MS, "").get("")
    if route:  # within dispatch: the handle's request created -> the router's decision
        out["stages_ms"]["route"] = {"p50": route["p50"], "mean": route["mean"]}
    for key in ("ingress_loop_lag_ms", "replica_loop_lag_ms", "ingress_loop_busy"):
        lags = sums(after, VIEW_GAUGES[key], "replica")
        out[key] = round(max(lags.values()), 2) if lags else None
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes and their CPU ------------------------------------------------------------------------------
def serve_processes() -> dict[int, str]:
    """pid -> role of every process this run started (descendants of this one: its own Ray only)."""
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            out[p.pid] = role_of(" ".join(p.cmdline()))
        except psutil.Error:
            continue
    return out


def cpu_snapshot(pids: dict[int, str]) -> dict:
    import psutil

    per_pid = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            per_pid[pid] = t.user + t.system
        except psutil.Error:
            continue
    me = resource.getrusage(resource.RUSAGE_SELF)
    sys_t = psutil.cpu_times()
    return {"t": time.perf_counter(), "pids": per_pid, "client": me.ru_utime + me.ru_stime,
            "machine_busy": sum(sys_t) - sys_t.idle - getattr(sys_t, "iowait", 0.0)}


def engine_counters(directory: Path) -> dict[int, dict]:
    out = {}
    for f in directory.glob("*.json"):
        try:
            c = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        out[c["pid"]] = c
    return out


# --- load ---------------------------------------------------------------------------------------------------
def prompt(words: int, key: str) -> list[dict]:
    from benchmarks.bench.tokens import words as filler

    return [{"role": "user", "content": filler("ingcap", key, words)}]


async def calibrate(client, target: int) -> tuple[int, int]:
    """Filler words giving about ``target`` prompt tokens (one probe request), and the tokens that gives."""
    from benchmarks.bench.spec import BenchRequest

    probe = 400
    rec = await client.send(BenchRequest(api="chat", max_tokens=1, messages=prompt(probe, "probe")),
                            time.perf_counter())
    if not rec.ok or not rec.prompt_tokens:
        raise RuntimeError(f"probe request failed: {rec.error} {rec.detail}")
    words = max(int(probe * target / rec.prompt_tokens), 1)
    return words, round(rec.prompt_tokens * words / probe)


async def run_level(base_url: str, conc: int, out_len: int, words: int, args, pids: dict[int, str],
                    counters: Path, metrics: str | None = None) -> dict:
    import httpx

    from benchmarks.bench.client import StreamClient
    from benchmarks.bench.spec import BenchRequest
    from benchmarks.bench.stats import percentile

    limits = httpx.Limits(max_connections=conc + 8, max_keepalive_connections=conc + 8)
    records = []
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300)) as http:
        client = StreamClient(http, base_url, MODEL, ignore_eos=True)
        start = time.perf_counter()
        end = start + args.warmup_s + args.duration_s
        marks: dict[str, tuple] = {}
        scrapes: dict[str, dict] = {}

        async def worker(w: int) -> None:
            k = 0
            while time.perf_counter() < end:
                req = BenchRequest(api="chat", max_tokens=out_len, messages=prompt(words, f"{conc}/{out_len}/{w}/{k}"))
                records.append(await client.send(req, start))
                k += 1

        async def marker() -> None:
            await asyncio.sleep(args.warmup_s)
            marks["a"] = (cpu_snapshot(pids), engine_counters(counters))
            scrapes["a"] = await asyncio.to_thread(scrape, metrics)
            await asyncio.sleep(max(end - time.perf_counter(), 0))
            marks["b"] = (cpu_snapshot(pids), engine_counters(counters))
            scrapes["b"] = await asyncio.to_thread(scrape, metrics)

        await asyncio.gather(marker(), *(worker(w) for w in range(conc)))
    (a, ea), (b, eb) = marks["a"], marks["b"]
    t0, t1 = a["t"] - start, b["t"] - start
    window = t1 - t0
    w = window_stats(records, t0, t1)
    cpu = cpu_by_role(a, b, pids)
    tokens, reqs = max(w["tokens"], 1.0), max(w["requests"], 1)
    ttft = sorted(w["ttfts"]) or [float("nan")]
    ing = cpu.get("ingress", 0.0)
    return {
        "concurrency": conc, "output_len": out_len, "window_s": round(window, 2),
        "requests": w["requests"], "errors": w["errors"], "tokens": round(w["tokens"]),
        "output_tok_per_s": round(w["tokens"] / window, 1), "req_per_s": round(w["requests"] / window, 2),
        "ttft_ms_p50": round(1000 * percentile(ttft, 50), 1), "ttft_ms_p90": round(1000 * percentile(ttft, 90), 1),
        "e2e_ms_p50": round(1000 * percentile(w["e2es"] or [float("nan")], 50), 1),
        "tokens_per_sse_chunk": round(w["tokens"] / max(w["chunks"], 1), 3),
        "cpu_cores": {k: round(v / window, 3) for k, v in cpu.items()},
        "cpu_s_per_1k_tok": {k: round(1000 * v / tokens, 4) for k, v in cpu.items()},
        "cpu_ms_per_req": {k: round(1000 * v / reqs, 2) for k, v in cpu.items()},
        "ingress_cpu_s": round(ing, 3),
        "ingress_ceiling_tok_per_s": round(tokens / ing) if ing > 0 else None,
        "replica_pacing": pacing(ea, eb, window, args.step_ms),
        **(stage_figures(scrapes["a"], scrapes["b"]) if scrapes.get("a") and scrapes.get("b") else {}),
    }


async def profile(base_url: str, conc: int, out_len: int, words: int, args, pids, counters, sample_dir: Path) -> dict:
    """The ingress's stacks during a run of its own at ``conc`` (``benchmarks.stack_sampler``: py-spy cannot attach
    to another process in this container); the hottest functions and the CPU of each of its threads."""
    ingress = next(p for p, r in pids.items() if r == "ingress")
    load = asyncio.create_task(run_level(base_url, conc, out_len, words, args, pids, counters))
    await asyncio.sleep(args.warmup_s)
    (sample_dir / "on").touch()
    await asyncio.sleep(args.profile_s)
    (sample_dir / "on").unlink()
    level = await load
    out = sample_dir / f"{ingress}.json"
    for _ in range(50):
        if out.exists():
            break
        await asyncio.sleep(0.1)
    else:
        return {"error": f"no samples from the ingress (pid {ingress})", "level_under_profiler": level}
    body = json.loads(out.read_text())
    folded = fold_stacks((f"{stack} {n}" for stack, n in body["stacks"]), top=args.profile_top)
    return {"concurrency": conc, "seconds": body["seconds"], "sampler": "benchmarks.stack_sampler",
            "ingress_thread_cpu_s": body["thread_cpu_s"], **folded, "level_under_profiler": level}


async def wait_serving(base_url: str, timeout_s: float = 180) -> None:
    import httpx

    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    deadline = time.time() + timeout_s
    async with httpx.AsyncClient(timeout=30) as http:
        while time.time() < deadline:
            try:
                if (await http.post(f"{base_url}/chat/completions", json=body)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1)
    raise TimeoutError(f"{base_url} not serving after {timeout_s}s")


async def drive(args, base_url: str, counters: Path, out_dir: Path) -> dict:
    import httpx

    from benchmarks.bench.client import StreamClient

    await wait_serving(base_url)
    async with httpx.AsyncClient(timeout=60) as http:
        words, prompt_tokens = await calibrate(StreamClient(http, base_url, MODEL), args.prompt_tokens)
    await asyncio.sleep(2)  # every Serve process is up now
    pids = serve_processes()
    try:
        metrics: str | None = node_metrics_url()
    except Exception:  # noqa: BLE001 - levels without their stages
        metrics = None
    levels = []
    for out_len in args.output_len:
        for conc in args.concurrency:
            r = await run_level(base_url, conc, out_len, words, args, pids, counters, metrics)
            print(json.dumps(r), flush=True)
            levels.append(r)
    result: dict = {"prompt_words": words, "prompt_tokens_approx": prompt_tokens, "levels": levels,
                    "processes": sorted(pids.values())}
    result["cost_fit"] = cost_fit(levels, ("ingress", "proxy", "haproxy", "replica"), args.output_len)
    if args.profile_s > 0:
        try:
            result["profile"] = await profile(base_url, max(args.concurrency), args.output_len[0], words, args, pids,
                                              counters, out_dir / "samples")
        except Exception as err:  # noqa: BLE001 - the measured levels are written regardless
            result["profile"] = {"error": repr(err)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64, 128])
    ap.add_argument("--output-len", type=lambda s: [int(x) for x in s.split(",")], default=[128])
    ap.add_argument("--prompt-tokens", type=int, default=500)
    ap.add_argument("--step-ms", type=float, default=20.0, help="the fake engines' step (one token per stream)")
    ap.add_argument("--ingress-replicas", type=int, default=1)
    ap.add_argument("--ingress-merge-busy", type=float, default=None,
                    help="the ingress's stream_merge_busy (default: the config's; 0: never asks on that account)")
    ap.add_argument("--ingress-merge-lag-ms", type=float, default=None,
                    help="the ingress's stream_merge_lag_ms (default: the config's; 0: never asks replicas to merge)")
    ap.add_argument("--strategy", default="kv-aware",
                    choices=["kv-aware", "round-robin", "prefix-aware", "least-loaded"])
    ap.add_argument("--warmup-s", type=float, default=5.0)
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--profile-s", type=float, default=0.0,
                    help="sample the ingress's stacks this long at the top concurrency")
    ap.add_argument("--profile-top", type=int, default=30)
    ap.add_argument("--python-proxy", action="store_true",
                    help="HTTP through Serve's Python proxy instead of HAProxy (Serve's throughput switches still on)")
    ap.add_argument("--no-fast-path", action="store_true", help="Serve's defaults: its Python proxy, no switches")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from benchmarks.bench.result import git_commit, machine_info
    from serve_app import settings

    machine, commit = machine_info(), git_commit()
    if args.no_fast_path:
        http = "Serve's Python proxy, Serve's defaults"
    elif args.python_proxy:
        http = "Serve's Python proxy"
        os.environ.update({k: v for k, v in settings.SERVE_FAST_PATH_ENV.items() if k != "RAY_SERVE_ENABLE_HA_PROXY"})
    else:  # what `kvserve serve --fast-path` sets for the Ray it starts
        from serve_app.haproxy_guard import fast_path_env

        http = "HAProxy -> the ingress replicas' servers"
        os.environ.update(fast_path_env())
    work = Path(tempfile.mkdtemp(prefix="ingcap-"))
    counters = work / "counters"
    counters.mkdir()
    (work / "samples").mkdir()
    with served_app(app_args(args, str(counters))) as port:
        result = asyncio.run(drive(args, f"http://127.0.0.1:{port}/v1", counters, work))
    out = {"command": " ".join([sys.executable, *sys.argv]), "machine": machine, "git_commit": commit,
           "fast_path": not args.no_fast_path, "http": http,
           "config": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
           "kv_events": "none: the fake engine publishes none (kv-aware keeps only its approximate index)",
           **result}
    print(json.dumps({k: v for k, v in out.items() if k not in ("levels",)}, indent=1, default=str))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
