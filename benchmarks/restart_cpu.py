"""Where a CPU replica's restart goes: kill a vLLM replica actor of a running app, time each phase until it serves.

Owns the issue-16 figures (benchmarks/results/restart_cpu.json). It serves ``--config`` (configs/cpu.yaml) on a
local Ray instance, keeps two probe clients sending one-token completions with prompts of their own (no
shared prefix, so no replica is preferred for its cache), then ``--kills`` times: kills one replica actor
(``ray.kill``, as benchmarks/hardening.py does) and time-stamps, from the kill:

    noticed        Serve's status no longer counts the killed replica RUNNING (its health check failed)
    process_start  the replacement actor's process started (Ray may hand Serve a worker it started earlier: then
                   this precedes the kill and its phase counts 0)
    module_loaded  Serve loaded deployments.vllm_replica in it (Ray's worker boot, the replica wrapper)
    init           VLLMReplica.__init__ entered
    vllm_imported  vLLM imported (deployments.engine)
    engine_config  AsyncEngineArgs -> VllmConfig built
    engine_started AsyncLLM constructed: the EngineCore process spawned, model loaded, KV cache sized, warmed up
    ready          the replica's constructor returned
    running        Serve's status counts it RUNNING again (the deployment HEALTHY)
    routed         the first probe answered by the new replica (the ``x-kvserve-replica`` header)

The replica-side steps come from the ``replica startup`` line each replica logs (wall clock, same machine);
vLLM's own figures of the EngineCore's start (``vllm``) from its lines in the replica worker's log.
``phases_s`` holds the per-step gaps, median over the kills; ``kills`` each kill's absolute offsets. Run under
the shared lock:

    flock /tmp/kvserve-ray.lock python benchmarks/restart_cpu.py --out benchmarks/results/restart_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench.result import git_commit, machine_info
from benchmarks.serverproc import deployment_states, replica_actors

#: The steps, in order; each phase is named by the step it ends at.
STEPS = ("noticed", "process_start", "module_loaded", "init", "vllm_imported", "engine_config", "engine_started",
         "ready", "running", "routed")
#: vLLM's own log lines of the EngineCore's start (its processes write to the replica worker's log files): the
#: figures it reports, and the steps whose wall-clock time its log line gives (to the second).
VLLM_FIGURES = {"weights_load_s": r"Loading weights took ([\d.]+) seconds",
                "kv_init_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"}
VLLM_STEPS = {"core_imported": r"\(EngineCore pid=\d+\) \w+ (\d\d-\d\d \d\d:\d\d:\d\d)",
              "load_start": r"(\d\d-\d\d \d\d:\d\d:\d\d) \[\S+\] Starting to load model",
              "weights_loaded": r"(\d\d-\d\d \d\d:\d\d:\d\d) \[\S+\] Loading weights took",
              "kv_sized": r"(\d\d-\d\d \d\d:\d\d:\d\d) \[\S+\] GPU KV cache size",
              "kv_ready": r"(\d\d-\d\d \d\d:\d\d:\d\d) \[\S+\] init engine"}


#: Inside engine construction (``engine_config`` -> ``engine_started``), from vLLM's log lines: the EngineCore
#: process imported vLLM, the model load began, the weights were in, the KV cache was sized, then allocated.
ENGINE_STEPS = ("engine_config", *VLLM_STEPS, "engine_started")


class Probes:
    """Client threads each sending one-token completions, ``pause_s`` apart; remembers who answered when."""

    def __init__(self, base: str, model: str, clients: int = 2, pause_s: float = 0.5) -> None:
        self.answers: list[tuple[float, str]] = []  # (wall time answered, replica id)
        self.errors = 0
        self._base, self._model, self._pause_s, self._stop = base, model, pause_s, threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            body = json.dumps({"model": self._model, "prompt": f"{uuid.uuid4().hex} count to three:",
                               "max_tokens": 1, "temperature": 0}).encode()
            req = urllib.request.Request(f"{self._base}/completions", body, {"content-type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    self.answers.append((time.time(), r.headers.get("x-kvserve-replica", "")))
            except Exception:  # noqa: BLE001 - counted; a replica leaving fails some requests
                self.errors += 1
            time.sleep(self._pause_s)

    def first_from(self, replica_id: str, after: float) -> float | None:
        return next((t for t, r in list(self.answers) if r == replica_id and t >= after), None)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=70)


def _replica_log(session: Path, uid: str, pid: int) -> dict[str, float]:
    """The ``replica startup`` line of replica ``uid`` (Serve's log file, or its worker's stderr)."""
    logs = session / "logs"
    for path in [*(logs / "serve").glob(f"replica_*_{uid}.log"), *logs.glob(f"worker-*-{pid}.err")]:
        for line in path.read_text(errors="replace").splitlines():
            if f"{uid} -- replica startup {{" in line:
                return json.loads(line[line.index("replica startup ") + len("replica startup "):].strip())
    return {}


def _vllm_log(session: Path, pid: int, year: int) -> tuple[dict[str, float], dict[str, float]]:
    """vLLM's figures and the wall-clock times of its steps, from the log files of replica worker ``pid``."""
    figures: dict[str, float] = {}
    steps: dict[str, float] = {}
    for path in (session / "logs").glob(f"worker-*-{pid}.*"):
        text = path.read_text(errors="replace")
        for key, pattern in VLLM_FIGURES.items():
            m = re.search(pattern, text)
            if m:
                figures[key] = float(m.group(1))
        for key, pattern in VLLM_STEPS.items():
            m = re.search(pattern, text)
            if m:
                steps[key] = datetime.strptime(f"{year}-{m.group(1)}", "%Y-%m-%d %H:%M:%S").timestamp()
    return figures, steps


def _kill_once(dep: str, want: int, probes: Probes, session: Path, timeout_s: float) -> dict:
    import ray

    before = replica_actors(dep)
    victim = before[0]
    t0 = time.time()
    ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=True)
    at: dict[str, float] = {}
    new: dict | None = None
    while time.time() - t0 < timeout_s and "routed" not in at:
        status, states = deployment_states("kvserve", dep)
        now = time.time()
        if "noticed" not in at and states.get("RUNNING", 0) < want:
            at["noticed"] = now
        if new is None:
            fresh = [a for a in replica_actors(dep) if a["id"] not in {b["id"] for b in before}]
            new = fresh[0] if fresh else None
        if new is not None and "running" not in at and status == "HEALTHY" and states.get("RUNNING", 0) >= want:
            at["running"] = now
        if "running" in at:
            uid = new["name"].rsplit("#", 1)[-1]
            routed = probes.first_from(uid, t0)
            if routed is not None:
                at["routed"] = routed
        time.sleep(0.25)
    if "routed" not in at:
        raise TimeoutError(f"the replacement of {victim['name']} did not serve within {timeout_s} s: {at}")
    uid = new["name"].rsplit("#", 1)[-1]
    at.update(_replica_log(session, uid, new["pid"]))
    figures, vllm_steps = _vllm_log(session, new["pid"], time.gmtime(t0).tm_year)
    offsets = {k: round(at[k] - t0, 2) for k in STEPS if k in at}
    return {"victim": victim["name"], "replacement": new["name"], "at_s": offsets, "vllm": figures,
            "engine_steps_at_s": {k: round(v - t0, 1) for k, v in vllm_steps.items()}}


def _phases(at: dict[str, float], steps: tuple[str, ...] = STEPS, origin: float = 0.0) -> dict[str, float]:
    """Seconds from the previous step (``origin`` before the first) to each step; one logged before its
    predecessor counts 0."""
    out, prev = {}, origin
    for k in steps:
        if k in at:
            out[k] = round(max(at[k] - prev, 0.0), 2)
            prev = max(prev, at[k])
    return out


def run(args) -> dict:
    import ray
    import yaml
    from ray import serve

    from serve_app.builder import build_app
    from serve_app.config import load_app_config

    raw = yaml.safe_load((ROOT / args.config).read_text())["applications"][0]["args"]
    cfg = load_app_config(raw)
    model, dep = cfg.models[0].id, "vllm-" + cfg.models[0].id
    want = cfg.models[0].deployment.num_replicas or 1
    ctx = ray.init(num_cpus=6, include_dashboard=True, object_store_memory=1024**3)
    session = Path(ctx.address_info["session_dir"])
    port = 18000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t_start = time.time()
    serve.run(build_app(cfg), name="kvserve", route_prefix="/", blocking=False)
    while deployment_states("kvserve", dep) != ("HEALTHY", {"RUNNING": want}):
        if time.time() - t_start > args.timeout_s * 2:
            raise TimeoutError(f"{dep} not up with {want} replicas within {args.timeout_s * 2} s")
        time.sleep(0.5)
    first_start_s = round(time.time() - t_start, 1)
    probes = Probes(f"http://127.0.0.1:{port}/v1", model)
    kills = []
    load_before = os.getloadavg()
    try:
        for i in range(args.kills):
            time.sleep(args.settle_s)
            kills.append(_kill_once(dep, want, probes, session, args.timeout_s))
            print(f"[kill {i + 1}] {kills[-1]}", flush=True)
    finally:
        probes.stop()
        serve.shutdown()
        ray.shutdown()
    def medians(per_kill: list[dict[str, float]], steps: tuple[str, ...]) -> dict[str, float]:
        return {s: round(statistics.median(p[s] for p in per_kill if s in p), 2) for s in steps
                if any(s in p for p in per_kill)}

    med = medians([_phases(k["at_s"]) for k in kills], STEPS)
    engine = medians([_phases({**k["at_s"], **k["engine_steps_at_s"]}, ENGINE_STEPS[1:], k["at_s"]["engine_config"])
                      for k in kills], ENGINE_STEPS[1:])
    totals = sorted(k["at_s"]["routed"] for k in kills)
    return {"restart_to_serving_s": round(statistics.median(totals), 1), "restart_to_serving_all_s": totals,
            "phases_s": med, "engine_phases_s": engine, "kills": kills, "probe_errors": probes.errors,
            "app_first_start_s": first_start_s,
            # The machine is shared: other work at niceness 0 outruns Ray's workers (niceness 15) on its 2 cores.
            "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "deployment": cfg.models[0].deployment.model_dump(include={"health_check_period_s",
                                                                     "health_check_timeout_s"})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/cpu.yaml")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--settle-s", type=float, default=10.0, help="seconds of serving before each kill")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per kill, until the replacement serves")
    p.add_argument("--out", default="benchmarks/results/restart_cpu.json")
    args = p.parse_args(argv)
    machine = machine_info()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    started = time.time()
    result = run(args)
    result.update({"goal_s": 30, "meets_goal": result["restart_to_serving_s"] <= 30, "config": args.config,
                   "command": shlex.join(["python", "benchmarks/restart_cpu.py",
                                          *(argv if argv is not None else sys.argv[1:])]),
                   "git_commit": git_commit(), "git_dirty": dirty, "machine": machine,
                   "wall_s": round(time.time() - started)})
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("restart_to_serving_s", "restart_to_serving_all_s", "phases_s")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
