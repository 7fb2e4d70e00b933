"""A cell that does not end: the bench bounded in time, and what every serving process was doing when it was cut.

Owns ``run_bounded`` (a command in its own process group, killed whole once it has run ``timeout_s``, after a
callback has looked at the stalled system) and ``dump_stacks`` (one ``py-spy dump`` of every engine core, replica,
ingress and bench process, each kept as a file beside the server log, with each thread's innermost frames in the
evidence: a stream that never ends shows where its engine, replica or client waits).

The head-to-head runs each cell's ``kvserve bench`` through ``run_bounded`` with ``run.py --cell-timeout`` (the
cell's duration plus a grace for the requests still in flight): a cell cut there is recorded with the stacks and
the evidence its probe scraped, and its system is stopped before the next one starts, so one stalled cell costs
the grace, not the rest of the device call.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.routing_h2h.host_cpu import HostCpu

#: processes whose stacks a cut cell keeps (``host_cpu.role``)
DUMP_ROLES = ("engine", "replica", "ingress", "client")
_FRAMES = 4  # innermost frames kept per thread in the evidence (the file has them all)


def run_bounded(cmd: list[str], cwd: Path, timeout_s: float,
                on_cut: Callable[[int], dict[str, Any]] = lambda group: {}) -> tuple[int | None, dict[str, Any] | None]:
    """Run ``cmd`` in a new process group; after ``timeout_s`` call ``on_cut`` with that group's id (the command
    still runs) and kill the group (SIGTERM, then SIGKILL after 5 s) -> (its return code, None), or (None,
    ``on_cut``'s result) when cut."""
    proc = subprocess.Popen(cmd, cwd=cwd, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s), None
    except subprocess.TimeoutExpired:
        seen = on_cut(proc.pid)
        _kill_group(proc)
        return None, seen


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def threads_of(dump: str, frames: int = _FRAMES) -> list[dict[str, Any]]:
    """``py-spy dump`` text -> one entry per thread: its header line and its ``frames`` innermost frames (py-spy
    prints a thread's stack innermost first, each frame indented under a ``Thread ...`` line)."""
    out: list[dict[str, Any]] = []
    for line in dump.splitlines():
        if line.startswith("Thread "):
            out.append({"thread": line.strip(), "frames": []})
        elif out and line.startswith((" ", "\t")) and line.strip() and len(out[-1]["frames"]) < frames:
            out[-1]["frames"].append(line.strip())
    return out


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def dump_stacks(out_dir: Path, label: str, cpu: HostCpu | None = None, exe: str | None = None,
                group: int | None = None) -> dict[str, Any]:
    """One ``py-spy dump`` of every process in ``DUMP_ROLES`` -> {processes: [{pid, role, file, threads}]} (raw dumps
    in ``out_dir`` as ``LABEL-stall-ROLE-PID.txt``), or an ``error`` where there is no py-spy or no /proc. Every
    process of process group ``group`` (the bench's, from ``run_bounded``) counts as a client: the bench's client
    processes are untitled ``multiprocessing`` children, which ``host_cpu.role`` cannot tell by their command line."""
    exe = exe or shutil.which("py-spy")
    if exe is None:
        return {"error": "py-spy not installed"}
    reading = (cpu or HostCpu()).read()
    if reading is None:
        return {"error": "no /proc to find the serving processes in"}
    t0 = time.time()
    processes = []
    for pid, (role, _, _) in sorted(reading.procs.items()):
        if group is not None and _group_of(pid) == group:
            role = "client"
        if role not in DUMP_ROLES:
            continue
        entry: dict[str, Any] = {"pid": pid, "role": role}
        try:
            done = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            processes.append(entry | {"error": f"py-spy dump: {err}"})
            continue
        if done.returncode != 0:
            processes.append(entry | {"error": f"py-spy dump rc {done.returncode}: {done.stderr.strip()[-200:]}"})
            continue
        path = Path(out_dir) / f"{label}-stall-{role}-{pid}.txt"
        path.write_text(done.stdout)
        processes.append(entry | {"file": path.name, "threads": threads_of(done.stdout)})
    return {"processes": processes, "seconds": round(time.time() - t0, 1)}
