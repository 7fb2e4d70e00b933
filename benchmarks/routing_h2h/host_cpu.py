"""Where a cell's CPU went on the serving host: whole-host busy cores and cores per process role, from /proc.

Owns ``HostCpu`` (a reader of /proc that turns two readings into an interval's usage), ``role`` (a process's
role from its command line), ``stat_ticks`` (a process's or thread's CPU ticks from its stat line) and
``ProcReading`` (one reading). The head-to-head's evidence (``evidence.Probe``)
takes a reading at the start of a cell and at every timeline point, and puts the interval's usage beside
Serve's and the router's gauges, so a stage that grew can be set against a host that ran out of cores or a
single process (a replica's or an ingress's asyncio loop, which holds the GIL) that ran at one core.

Per interval (``usage``)::

    busy_cores       host CPU time not idle or waiting for I/O, in cores (of ``cores``)
    by_role          role -> cores, summed over its processes (engine cores, replicas, ingresses, haproxy,
                     bench clients, Ray's own processes, Serve's controller and proxies, other)
    processes        per replica and ingress process: cores, and its busiest thread's cores and name

Reads only /proc (Linux); elsewhere ``HostCpu.available`` is False and the evidence carries no ``host_cpu``.
Times are in clock ticks (``os.sysconf('SC_CLK_TCK')``), so an interval's figures are as fine as 1/100 s.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

ROLES = ("engine", "replica", "ingress", "haproxy", "client", "serve", "ray", "other")
#: roles whose processes are listed one by one, with their busiest thread
_PER_PROCESS = ("replica", "ingress")


def role(cmdline: str) -> str:
    """The role of a process from its command line (Ray and vLLM set process titles: ``ray::ServeReplica:app:
    deployment`` or ``...:deployment.method`` while it runs one, ``VLLM::EngineCore``)."""
    if "EngineCore" in cmdline or "VLLM::Worker" in cmdline:
        return "engine"
    if "ServeReplica:" in cmdline:  # ray::ServeReplica:APP:DEPLOYMENT, ".method" appended while it runs one
        deployment = cmdline.split("ServeReplica:", 1)[1].split(" ", 1)[0].split(":")[-1].split(".", 1)[0]
        return "ingress" if deployment == "ingress" else "replica"
    if "haproxy" in cmdline:
        return "haproxy"
    if "benchmarks.cli" in cmdline or "kvserve bench" in cmdline:
        return "client"
    if "ServeController" in cmdline or "ProxyActor" in cmdline:
        return "serve"
    if any(k in cmdline for k in ("raylet", "gcs_server", "dashboard", "ray::", "runtime_env", "log_monitor")):
        return "ray"
    return "other"


@dataclasses.dataclass(frozen=True)
class ProcReading:
    """One reading: host ticks (busy, total), and per process its role, name, ticks and per-thread ticks."""

    busy: int
    total: int
    procs: dict[int, tuple[str, str, int]]  # pid -> (role, name, ticks)
    threads: dict[int, dict[int, tuple[str, int]]]  # pid (replica/ingress only) -> tid -> (thread name, ticks)


def stat_ticks(stat_line: str) -> tuple[str, int]:
    """(comm, utime + stime) of a /proc/<pid>/stat line (comm may hold spaces and parentheses)."""
    comm = stat_line[stat_line.index("(") + 1:stat_line.rindex(")")]
    rest = stat_line[stat_line.rindex(")") + 2:].split()
    return comm, int(rest[11]) + int(rest[12])


class HostCpu:
    """Readings of ``proc`` (``/proc`` unless a test gives another root)."""

    def __init__(self, proc: str | Path = "/proc") -> None:
        self.proc = Path(proc)
        self.cores = os.cpu_count() or 1
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @property
    def available(self) -> bool:
        return (self.proc / "stat").is_file()

    def read(self) -> ProcReading | None:
        """A reading now; None where /proc cannot be read."""
        try:
            fields = [int(x) for x in (self.proc / "stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
        procs: dict[int, tuple[str, str, int]] = {}
        threads: dict[int, dict[int, tuple[str, int]]] = {}
        for d in self.proc.iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                name, ticks = stat_ticks((d / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile, or a kernel thread without a readable line
            r = role(cmd) if cmd else "other"
            procs[int(d.name)] = (r, cmd.split(" ")[0][:60] or name, ticks)
            if r in _PER_PROCESS:
                threads[int(d.name)] = self._threads(d)
        return ProcReading(total - idle, total, procs, threads)

    @staticmethod
    def _threads(d: Path) -> dict[int, tuple[str, int]]:
        out: dict[int, tuple[str, int]] = {}
        try:
            tasks = list((d / "task").iterdir())
        except OSError:
            return out
        for t in tasks:
            try:
                out[int(t.name)] = stat_ticks((t / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
        return out

    def usage(self, before: ProcReading, after: ProcReading, seconds: float) -> dict:
        """What ran between two readings ``seconds`` apart, in cores (see the module docstring)."""
        if seconds <= 0:
            return {}
        total = after.total - before.total
        busy_cores = (after.busy - before.busy) / total * self.cores if total > 0 else 0.0
        by_role = dict.fromkeys(ROLES, 0.0)
        processes = []
        for pid, (r, name, ticks) in after.procs.items():
            prev = before.procs.get(pid)
            used = (ticks - (prev[2] if prev is not None else 0)) / self.hz / seconds  # new: all its life
            by_role[r] += used
            if r in _PER_PROCESS:
                t_before = before.threads.get(pid, {})
                busiest = max(((n, (tk - t_before.get(tid, (n, 0))[1]) / self.hz / seconds)
                               for tid, (n, tk) in after.threads.get(pid, {}).items()),
                              key=lambda x: x[1], default=("", 0.0))
                processes.append({"pid": pid, "role": r, "cores": round(used, 2),
                                  "busiest_thread": busiest[0], "busiest_thread_cores": round(busiest[1], 2)})
        processes.sort(key=lambda p: (p["role"], -p["cores"]))
        return {"cores": self.cores, "busy_cores": round(busy_cores, 2),
                "by_role": {k: round(v, 2) for k, v in by_role.items() if v >= 0.005},
                "processes": processes}
