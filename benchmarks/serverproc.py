"""Starting and stopping a server process for a benchmark run.

Owns ``start`` (a server command in its own process group, output to a log file), ``wait_ready``
(poll an OpenAI ``/v1/models`` URL until it lists a model, failing fast when the process exits),
``wait_serving`` (until a one-token completion succeeds: an ingress can list models while its engine
replicas are still starting), ``wait_app_running`` (until Serve reports every replica of the app running: one
replica serving is not all of them; each poll asked by a child process, ``python -m benchmarks.serverproc app-status
APP``) and ``stop`` (SIGINT to the whole group, SIGKILL after a grace period); ``leftovers`` (what an earlier server
left: listeners on its ports, vLLM engine cores, HAProxy), ``kill_found`` (end such leftovers by pid, only the
ones found, and check they are gone), ``gpu_memory_used_mib`` (nvidia-smi, where there is one),
``deployment_name`` (the Serve deployment of a model id, as ``deployments.vllm_replica`` names it) and
``replica_actors`` (the live Serve replica actors of a deployment, for fault injection).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from serve_app.launcher import sweep


def start(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    """Run ``cmd`` in a new session (so ``stop`` reaches its children), stdout+stderr to ``log_path``."""
    log = open(log_path, "w")  # noqa: SIM115 - owned by the process for its lifetime
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=cwd)


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen) -> float:
    """Seconds until ``url`` (``.../v1/models``) lists a model; raise if the process exits or time runs out."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200 and b'"data":[{' in r.read().replace(b" ", b""):
                    return time.time() - t0
        except Exception:  # noqa: BLE001, S110 - not up yet
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


def stop(proc: subprocess.Popen, timeout_s: float = 60, sig: signal.Signals = signal.SIGINT) -> None:
    """``sig`` (SIGINT) to the process group, then SIGKILL it if it has not exited within ``timeout_s``."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_serving(base_url: str, model: str, timeout_s: float, proc: subprocess.Popen,
                 api_key: str | None = None) -> float:
    """Seconds until ``POST base_url/completions`` for one token of ``model`` answers 200 (with ``api_key``)."""
    t0 = time.time()
    body = json.dumps({"model": model, "prompt": [1, 2, 3], "max_tokens": 1}).encode()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before serving")
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        req = urllib.request.Request(base_url + "/completions", data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                if r.status == 200:
                    return time.time() - t0
        except Exception:  # noqa: BLE001, S110 - replicas still starting
            pass
        time.sleep(2)
    raise TimeoutError(f"{base_url} did not serve {model} within {timeout_s}s")


def wait_app_running(app: str, timeout_s: float, proc: subprocess.Popen,
                     status: Callable[[str], tuple[str, dict[str, dict[str, int]]]] | None = None,
                     poll_s: float = 1.0) -> dict[str, Any]:
    """Wait until Serve reports ``app`` RUNNING (every deployment HEALTHY: all its target replicas running) ->
    ``{"waited_s", "deployments": {name: {state: count}}}``; ``status(app)`` -> (the app's status, its deployments'
    replicas by state) defaults to ``app_status_in_child``. Raises if the process exits or time runs out (the
    message names the replica states last seen)."""
    status = status or app_status_in_child
    t0, seen = time.time(), ("", {})
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before every replica of {app} ran")
        seen = status(app)
        if seen[0] == "RUNNING":
            return {"waited_s": round(time.time() - t0, 1), "deployments": seen[1]}
        time.sleep(poll_s)
    raise TimeoutError(f"{app} not RUNNING after {timeout_s}s (last: {seen[0] or 'no status'} {seen[1]})")


@contextlib.contextmanager
def ray_driver() -> Iterator[None]:
    """A Ray driver connected to the running cluster for the block (closed after it)."""
    import ray

    ray.init(address="auto", namespace="kvserve_bench", logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def app_status(app: str) -> tuple[str, dict[str, dict[str, int]]]:
    """``app``'s status and its deployments' replicas counted by state, from ``serve.status()`` (needs a connected
    Ray driver); ``("", {})`` while the app is not deployed yet."""
    from ray import serve

    found = serve.status().applications.get(app)
    if found is None:
        return "", {}
    return _name(found.status), {name: _replica_counts(d) for name, d in found.deployments.items()}


def _name(state: Any) -> str:
    """A Serve status enum's string (its ``value``), or the string itself."""
    return getattr(state, "value", state)


def _replica_counts(deployment: Any) -> dict[str, int]:
    """A ``serve.status()`` deployment's replicas counted by state name."""
    return {_name(k): v for k, v in deployment.replica_states.items()}


def app_status_in_child(app: str, timeout_s: float = 120.0) -> tuple[str, dict[str, dict[str, int]]]:
    """``app_status`` asked by a child process with its own Ray driver: a driver in this process would keep Serve's
    client (its controller's handle) after ``ray.shutdown``, so a later server's wait would ask a controller of the
    cluster already stopped. Raises ConnectionError when the child cannot ask (no cluster to connect to)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.serverproc", "app-status", app], capture_output=True,
                         text=True, check=False, timeout=timeout_s, cwd=Path(__file__).resolve().parents[1])
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise ConnectionError(f"Serve status of {app} (exit {out.returncode}): {out.stderr.strip()[-300:]}")
    found, deployments = json.loads(lines[-1])
    return found, deployments


def is_leftover_process(name: str, argv: list[str]) -> bool:
    """A vLLM engine/worker (its process title, ``VLLM::EngineCore``/``VLLM::Worker``, set by vLLM) or an
    HAProxy binary. Judged by the process's own name and first argument only: a shell or a tool whose
    command line merely mentions those words (``grep -v EngineCore``) is not one."""
    first = argv[0] if argv else ""
    return (name.startswith("VLLM::") or first.startswith("VLLM::") or "EngineCore" in first.split("/")[-1]
            or name == "haproxy" or first.split("/")[-1] == "haproxy")


def leftovers(ports: tuple[int, ...]) -> dict:
    """What still runs of an earlier server: listeners on ``ports``, vLLM engine cores, HAProxy (never this
    process or one of its ancestors)."""
    import psutil

    listening = sorted({c.laddr.port for c in psutil.net_connections("tcp")
                        if c.status == psutil.CONN_LISTEN and c.laddr.port in ports})
    me = psutil.Process()
    mine = {me.pid, *(a.pid for a in me.parents())}
    procs = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        argv = p.info["cmdline"] or []
        if p.info["pid"] not in mine and is_leftover_process(p.info["name"] or "", argv):
            procs.append({"pid": p.info["pid"], "cmd": (" ".join(argv) or p.info["name"] or "")[:160]})
    return {"listening": listening, "processes": procs}


def kill_found(procs: list[dict], must_contain: str = "EngineCor", grace_s: float = 10.0) -> dict:
    """SIGTERM, then SIGKILL after ``grace_s``, the processes of ``procs`` ({pid, cmd}, as ``leftovers`` lists
    them) whose command line contains ``must_contain`` and still does (a reused pid is left alone); then
    check which are gone. A listed process whose leader already exited (psutil: a zombie; its command line
    reads empty) may still hold threads and GPU memory while it tears down: it is SIGKILLed and waited for
    too (``exiting``). Returns {killed: [{pid, cmd}], sigkilled: [pid], exiting: [pid], still_alive: [pid],
    skipped: [pid]}."""
    import psutil

    out: dict = {"killed": [], "sigkilled": [], "exiting": [], "still_alive": [], "skipped": []}
    targets, exiting = [], []
    for p in procs:
        if must_contain not in p["cmd"]:
            continue
        try:
            proc = psutil.Process(p["pid"])
        except psutil.NoSuchProcess:
            continue  # already gone
        try:
            text = " ".join(proc.cmdline()) or proc.name()
        except psutil.ZombieProcess:
            exiting.append(proc)
            out["exiting"].append(p["pid"])
            continue
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            out["skipped"].append(p["pid"])
            continue
        if must_contain not in text:
            out["skipped"].append(p["pid"])
            continue
        targets.append(proc)
        out["killed"].append({"pid": p["pid"], "cmd": p["cmd"]})
    sweep(targets, grace_s, sigkilled=out["sigkilled"])
    for proc in exiting:
        try:
            proc.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(targets + exiting, timeout=max(5.0, grace_s if exiting else 0.0))
    out["still_alive"] = [p.pid for p in alive]
    return out


def gpu_memory_used_mib() -> list[int] | None:
    """Memory used per GPU (MiB) from nvidia-smi, or None where there is none."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return [int(x) for x in r.stdout.split() if x.strip().isdigit()]


def deployment_name(model_id: str) -> str:
    """The vLLM deployment of ``model_id``: ``vllm-`` + the id with characters other than alphanumerics,
    ``-`` and ``_`` replaced by ``-`` (``llama-3.2-1b`` -> ``vllm-llama-3-2-1b``), as
    ``deployments.vllm_replica.build_replica`` names it."""
    return "vllm-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in model_id)


def replica_actors(part: str) -> list[dict]:
    """Alive actors whose class name contains ``part`` (Serve replicas: ``ServeReplica:<app>:<deployment>``),
    as {id, pid, name}; needs a connected Ray driver and the dashboard's state API."""
    from ray.util.state import list_actors

    return [{"id": a.actor_id, "pid": a.pid, "name": a.name} for a in list_actors(
        filters=[("state", "=", "ALIVE")], limit=1000) if part in (a.class_name or "")]


def deployment_states(app: str, dep: str) -> tuple[str, dict[str, int]]:
    """``dep``'s status in ``app`` and its replicas counted by state (``("HEALTHY", {"RUNNING": 2})``), from
    ``serve.status()``; needs a connected Ray driver."""
    from ray import serve

    d = serve.status().applications[app].deployments[dep]
    return _name(d.status), _replica_counts(d)


if __name__ == "__main__":  # app_status_in_child's child: python -m benchmarks.serverproc app-status APP
    if len(sys.argv) != 3 or sys.argv[1] != "app-status":
        sys.exit("usage: python -m benchmarks.serverproc app-status APP")
    with ray_driver():
        print(json.dumps(app_status(sys.argv[2])))
