"""What the ingress's readiness polling costs: one ``serve.status()`` call, and an idle ingress's CPU.

The ingress learns which models can serve from Ray Serve's public ``serve.status()``, polled on a thread
(``deployments.readiness``). Each call builds Serve's whole instance details, and every deployment's request-router
config cloudpickles its router class by value on the way, with the GIL held. This measures, against a running app
(``configs/cpu.yaml``'s, with ``--replicas`` step-clock fake engines as in ``benchmarks/ingress_capacity.py``,
HTTP through HAProxy):

* ``status_call``: the CPU and wall time of one ``serve.status()`` in this driver process (median of ``--calls``);
* ``idle_ingress``: the ingress process's CPU per second while no request arrives, over ``--idle-s`` after
  ``--settle-s`` (the readiness thread's polling is most of it).

    flock /tmp/kvserve-ray.lock python -m benchmarks.readiness_poll --out benchmarks/results/readiness_poll_cpu.json

``--append`` adds this run to the file's ``runs`` (a run at another commit beside the earlier ones).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.bench.result import git_commit, machine_info


def measure(args: argparse.Namespace) -> dict:
    from ray import serve

    from benchmarks.ingress_capacity import app_args, cpu_snapshot, serve_processes, served_app
    from serve_app.haproxy_guard import fast_path_env

    os.environ.update(fast_path_env())
    work = Path(tempfile.mkdtemp(prefix="readiness-"))
    ns = argparse.Namespace(step_ms=20.0, replicas=args.replicas, strategy="kv-aware", profile_s=0)
    with served_app(app_args(ns, str(work))) as port:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the app did not become ready within 300 s")
            time.sleep(1)
        cpu, wall = [], []
        for _ in range(args.calls):
            c0, w0 = time.process_time(), time.perf_counter()
            serve.status()
            cpu.append((time.process_time() - c0) * 1000)
            wall.append((time.perf_counter() - w0) * 1000)
        ingress = {pid: role for pid, role in serve_processes().items() if role == "ingress"}
        if not ingress:
            raise RuntimeError("no ingress replica process found")
        time.sleep(args.settle_s)
        a = cpu_snapshot(ingress)
        time.sleep(args.idle_s)
        b = cpu_snapshot(ingress)
    idle = sum(b["pids"][p] - a["pids"][p] for p in ingress if p in a["pids"] and p in b["pids"]) / (b["t"] - a["t"])
    return {"status_call": {"calls": args.calls, "cpu_ms_p50": round(statistics.median(cpu), 2),
                            "wall_ms_p50": round(statistics.median(wall), 2)},
            "idle_ingress": {"settle_s": args.settle_s, "idle_s": args.idle_s,
                             "cpu_ms_per_s": round(1000 * idle, 1)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--settle-s", type=float, default=10.0)
    ap.add_argument("--idle-s", type=float, default=30.0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--append", action="store_true", help="add this run to --out's runs")
    args = ap.parse_args(argv)
    run = {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.readiness_poll", *(argv or sys.argv[1:])]),
           "git_commit": git_commit(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "load_average_1_5_15": list(os.getloadavg()), **measure(args)}
    print(json.dumps(run, indent=1))
    if args.out:
        doc = json.loads(args.out.read_text()) if args.append and args.out.exists() else {
            "machine": machine_info(), "runs": []}
        doc["runs"].append(run)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
