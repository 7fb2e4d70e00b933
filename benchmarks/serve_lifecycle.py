"""Lifecycle timings of ``kvserve serve`` (what ``./dev serve`` runs) on this machine.

Starts ``kvserve serve CONFIG`` on a free port and measures: seconds to its ``ready at`` line and to
the first answer; then, ``--restarts`` times, SIGKILLs one vLLM replica's process and measures the
seconds until ``serve status`` shows one replica fewer RUNNING, then all RUNNING again and until a
request is answered while it restarts (the other replica serves; with one replica, until it is back);
finally SIGTERM and the seconds until the command exits and every process it started is gone.

Usage: ``python -m benchmarks.serve_lifecycle [--config configs/cpu.yaml] [--restarts 2] [--out PATH]``;
writes benchmarks/results/serve_lifecycle_cpu.json (command, machine, git commit). Run it alone (it
starts Ray and the engines; RAY_AUTH_MODE=token, as ``./dev`` sets it).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running_replicas(env: dict[str, str]) -> dict[str, int]:
    out = subprocess.run(["serve", "status"], env=env, capture_output=True, text=True, timeout=60, check=False).stdout
    doc = yaml.safe_load(out) or {}
    counts = {}
    for app in (doc.get("applications") or {}).values():
        for name, dep in (app.get("deployments") or {}).items():
            counts[name] = int((dep.get("replica_states") or {}).get("RUNNING", 0))
    return counts


def _replica_pids(root: psutil.Process, deployment: str) -> list[int]:
    return [p.pid for p in root.children(recursive=True)
            if p.is_running() and f"ServeReplica:kvserve:{deployment}" in " ".join(p.cmdline())]


def _wait(pred, timeout_s: float, poll_s: float = 0.5) -> float | None:
    t = time.monotonic()
    while time.monotonic() - t < timeout_s:
        if pred():
            return round(time.monotonic() - t, 1)
        time.sleep(poll_s)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cpu.yaml")
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_lifecycle_cpu.json"))
    a = ap.parse_args()
    from benchmarks.bench.result import git_commit, machine_info

    port = _free_port()
    doc = yaml.safe_load((ROOT / a.config).read_text())
    doc["http_options"] = {**(doc.get("http_options") or {}), "host": "127.0.0.1", "port": port}
    cfg_path = Path(f"/tmp/kvserve-lifecycle-{port}.yaml")
    cfg_path.write_text(yaml.safe_dump(doc))
    deployment = "vllm-" + doc["applications"][0]["args"]["models"][0]["id"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    base = f"http://127.0.0.1:{port}"
    result = {"command": "python -m benchmarks.serve_lifecycle " + " ".join(sys.argv[1:]), "machine": machine_info(),
              "git_commit": git_commit(), "config": a.config}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "serve_app.cli", "serve", str(cfg_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    kept: list[str] = []
    try:
        while True:
            line = lines.get(timeout=900)
            kept.append(line.rstrip())
            if "kvserve: ready at" in line:
                break
        result["ready_line_s"] = round(time.monotonic() - t0, 1)
        result["ready_line"] = kept[-1]
        r = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=120)
        result["first_answer_s"] = round(time.monotonic() - t0, 1)
        assert r.status_code == 200, r.text
        root = psutil.Process(proc.pid)
        n_replicas = _running_replicas(env)[deployment]
        restarts = []
        for _ in range(a.restarts):
            pids = _replica_pids(root, deployment)
            os.kill(pids[0], signal.SIGKILL)
            t = time.monotonic()
            served = [0, 0]

            def probe(served: list[int] = served) -> bool:
                ok = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=120).status_code == 200
                served[0 if ok else 1] += 1
                return False

            seen = _wait(lambda: _running_replicas(env).get(deployment, 0) < n_replicas, 60, poll_s=0.2)
            back = _wait(lambda: probe() or _running_replicas(env).get(deployment) == n_replicas, 300, poll_s=1)
            restarts.append({"kill_seen_in_serve_status_s": seen,
                             "all_replicas_running_again_s": None if back is None or seen is None else seen + back,
                             "requests_ok_meanwhile": served[0], "requests_failed_meanwhile": served[1],
                             "replicas": n_replicas})
            print("restart", restarts[-1], flush=True)
            _wait(lambda: False, 5)  # let the health checks settle before the next kill
        result["restarts"] = restarts
        tree = root.children(recursive=True)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        result["sigterm_to_exit_s"] = round(time.monotonic() - t, 1)
        time.sleep(1)
        result["processes_left_after_exit"] = [p.name() for p in tree if p.is_running()
                                               and p.status() != psutil.STATUS_ZOMBIE]
        result["exit_code"] = proc.returncode
        time.sleep(0.5)
        while not lines.empty():
            kept.append(lines.get().rstrip())
        result["stop_output"] = [ln for ln in kept if ln.startswith("kvserve:")][-4:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
