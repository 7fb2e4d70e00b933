"""``deployments/parent_watch.py``: a ``multiprocessing`` child (as vLLM's EngineCore is of its replica) ends itself,
SIGTERM first, when its parent is killed; any other process is left alone; a watch that cannot start raises nothing;
the plugin is registered with vLLM."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from deployments.parent_watch import watch_parent

pytestmark = pytest.mark.unit


def _leaf(marker: str) -> None:
    def on_term(*_):
        Path(marker).write_text("terminated")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    armed = watch_parent(grace_s=5.0, poll_s=0.2)
    Path(marker).write_text(f"armed {armed} {os.getpid()}")
    time.sleep(60)


def _middle(marker: str) -> None:  # the replica: starts the engine core, then is killed
    multiprocessing.get_context("spawn").Process(target=_leaf, args=(marker,)).start()
    time.sleep(60)


def _wait_for(cond, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="process tree semantics of Linux")
def test_a_child_whose_parent_is_killed_ends_itself_with_a_sigterm_first(tmp_path):
    marker = tmp_path / "leaf"
    middle = multiprocessing.get_context("spawn").Process(target=_middle, args=(str(marker),))
    middle.start()
    try:
        assert _wait_for(lambda: marker.exists() and marker.read_text().startswith("armed"), 30)
        _, armed, pid = marker.read_text().split()
        assert armed == "True"
        os.kill(middle.pid, signal.SIGKILL)  # as `ray stop --force` or the OOM killer ends a replica actor
        assert _wait_for(lambda: marker.read_text() == "terminated", 10)
        assert _wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in _state(pid), 10)
    finally:
        middle.kill()
        middle.join(5)


def _state(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_a_process_multiprocessing_did_not_start_is_left_alone():
    assert multiprocessing.parent_process() is None  # pytest's own process
    assert watch_parent(on_death=lambda pid: pytest.fail("no parent to watch")) is False


def test_a_watch_that_cannot_start_leaves_the_process_running(monkeypatch):
    import deployments.parent_watch as pw

    def broken():
        raise ValueError("process not started")

    monkeypatch.setattr(pw, "_started", False)
    monkeypatch.setattr(pw, "watch_parent", broken)
    pw.register()  # logs, does not raise
    assert pw._started


def test_vllm_finds_the_plugin():
    found = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert found.get("kvserve_parent_watch") == "deployments.parent_watch:register"
