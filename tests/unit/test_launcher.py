"""``kvserve serve``'s pieces without Ray: URLs, the wait for readiness, signals, the process sweep."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from serve_app import launcher

pytestmark = pytest.mark.unit


def test_health_url_uses_loopback_for_a_wildcard_host() -> None:
    assert launcher.health_url({"host": "0.0.0.0", "port": 8000}) == (
        "http://127.0.0.1:8000/health", "http://127.0.0.1:8000/v1")
    assert launcher.health_url(None) == ("http://127.0.0.1:8000/health", "http://127.0.0.1:8000/v1")


def test_wait_ready_reports_progress_and_returns_when_every_model_is_ready() -> None:
    answers = iter([(0, None), (503, {"status": "starting", "models": {"m": "starting"}}),
                    (503, {"status": "starting", "models": {"m": "starting"}}),
                    (200, {"status": "ok", "models": {"m": "ready"}})])
    clock = iter(range(0, 1000, 20))
    said: list[str] = []
    assert launcher.wait_ready(lambda: next(answers), threading.Event(), said.append,
                               now=lambda: float(next(clock)), poll_s=0)
    assert said and all(s.startswith("kvserve: waiting for the models") for s in said)
    assert "m: starting" in said[-1] or "not answering" in said[-1]


def test_wait_ready_gives_up_when_stopped() -> None:
    stop = threading.Event()
    stop.set()
    assert not launcher.wait_ready(lambda: (503, None), stop, print)


def test_progress_line_names_each_model_state() -> None:
    assert launcher.progress_line(503, {"models": {"b": "starting", "a": "ready"}}) == "a: ready, b: starting"
    assert launcher.progress_line(0, None) == "HTTP proxy not answering yet"
    assert launcher.progress_line(404, None) == "the app's route is not up yet"


def test_first_signal_requests_a_stop_and_the_second_forces_it() -> None:
    s = launcher._Stopper()
    s._on_signal(signal.SIGTERM, None)
    assert s.requested.is_set() and not s.forced.is_set() and s.signal_name == "SIGTERM"
    s._on_signal(signal.SIGINT, None)
    assert s.forced.is_set() and s.signal_name == "SIGTERM"


def test_sweep_ends_processes_that_ignore_sigterm() -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        t = time.monotonic()
        assert launcher.sweep([psutil.Process(child.pid)], grace_s=0.5) == 1
        assert child.wait(timeout=5) == -signal.SIGKILL
        assert time.monotonic() - t < 5
    finally:
        if child.poll() is None:
            child.kill()
