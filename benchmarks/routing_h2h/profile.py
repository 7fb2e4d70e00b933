"""What the serving processes' Python threads were doing during a cell: py-spy samples of each replica, ingress and
vLLM engine core.

Owns ``CellProfiler`` (starts ``py-spy record`` on every replica, ingress and engine-core process a while into a
cell, for a fixed time, without stopping them) and ``summarize`` (pure: py-spy's raw collapsed stacks -> per thread
its share of the samples and its top frames, self and inclusive). ``run.py --profile WORKLOAD:LEVEL,...`` turns it on
for those cells; the raw files stay in the work directory (the device's log archive) and the summary goes into the
cell's ``evidence.profile``, so a stage that grew (a replica's event loop lagging) can be read against the code
that held its thread.

py-spy samples 100 times a second and skips idle threads (blocked in a system call outside Python), so a
thread's sample share is roughly the share of the window it ran Python (or native code called from Python).
With ``idle`` (``run.py --profile-idle``) it samples them too (py-spy's ``--idle``): every thread is then sampled
the whole window, and a frame's share is the share of wall time the thread spent under it, blocked or not (an
event loop's synchronous ``ray.get``, for one, which the default leaves out).
It needs ptrace access to the processes; where it has none (or is not installed) the in-process
``benchmarks.stack_sampler`` takes the samples instead (``run.py --profile`` installs it in the Serve replicas, idle
until turned on; the engine cores, vLLM's own processes, have none and go unsampled then), and where neither can,
the evidence says so; the cell runs unchanged in every case.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.ingress_figures import fold_threads
from benchmarks.routing_h2h.host_cpu import HostCpu

ROLES = ("replica", "ingress")  # the processes the in-process sampler can be in
PYSPY_ROLES = (*ROLES, "engine")  # py-spy also reads vLLM's engine cores (host_cpu.role: VLLM::EngineCore)
_TOP = 15


def summarize(raw: str, top: int = _TOP) -> dict[str, Any]:
    """py-spy ``--format raw --threads`` lines (``frame;frame;... count``, the thread as the first frame) ->
    {samples, threads: [{thread, samples, share, opaque_samples, top_self: [[frame, share]], top_inclusive}]},
    busiest thread first, folded by ``ingress_figures.fold_threads`` (frames without line numbers; a thread's
    samples inside C code, such as an event loop's ``Thread.run``, in ``opaque_samples``, not among its frames);
    every share is of the process's samples."""
    folded = fold_threads(raw.splitlines())
    total = sum(t.samples + t.opaque for t in folded.values())
    threads = []
    for thread, t in folded.items():
        n = t.samples + t.opaque
        threads.append({"thread": thread, "samples": n, "share": round(n / total, 3) if total else 0.0,
                        "opaque_samples": t.opaque,
                        "top_self": [[f, round(c / total, 3)] for f, c in t.own.most_common(top)],
                        "top_inclusive": [[f, round(c / total, 3)] for f, c in t.incl.most_common(top)]})
    threads.sort(key=lambda t: -t["samples"])
    return {"samples": total, "threads": threads}


class CellProfiler:
    """``start()`` at a cell's start: after ``delay_s`` records ``seconds`` of each serving process; ``finish()``
    waits for the recordings and returns the evidence (a list, or an ``error``).

    py-spy (``record --nonblocking``, raw stacks into ``out_dir``) where it can attach: a ``py-spy dump`` of one
    process is tried first. Where it cannot (no ptrace in the container) and ``sample_dir`` is given, the in-process
    ``benchmarks.stack_sampler`` that ``run.py --profile`` installs in every replica and ingress process is turned
    on for the window instead (its ``on`` file); its stacks carry no thread names, its thread CPU comes with them."""

    def __init__(self, out_dir: Path, label: str, delay_s: float = 8.0, seconds: float = 10.0,
                 rate_hz: int = 100, cpu: HostCpu | None = None, sample_dir: Path | None = None,
                 idle: bool = False) -> None:
        self.out_dir, self.label, self.idle = Path(out_dir), label, idle
        self.delay_s, self.seconds, self.rate_hz = delay_s, seconds, rate_hz
        self.sample_dir = None if sample_dir is None else Path(sample_dir)
        self._cpu = cpu or HostCpu()
        self._procs: list[tuple[int, str, Path, subprocess.Popen]] = []
        self._sampled: list[tuple[int, str]] = []
        self.method: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._record, daemon=True)
        self._thread.start()

    def _record(self) -> None:
        if self._stop.wait(self.delay_s):
            self.error = f"the cell ended within the profile's delay ({self.delay_s:g} s)"
            return
        reading = self._cpu.read()
        if reading is None:
            self.error = "no /proc to find the serving processes in"
            return
        targets = [(pid, role) for pid, (role, _, _) in sorted(reading.procs.items()) if role in PYSPY_ROLES]
        if not targets:
            return
        exe = shutil.which("py-spy")
        why = "py-spy not installed" if exe is None else _cannot_attach(exe, targets[0][0])
        if why is None:
            self.method = "py-spy"
            for pid, role in targets:
                out = self.out_dir / f"{self.label}-{role}-{pid}.pyspy.txt"
                cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(self.seconds)), "--rate",
                       str(self.rate_hz), "--format", "raw", "--threads", "--nonblocking", "--output", str(out),
                       *(["--idle"] if self.idle else [])]
                self._procs.append((pid, role, out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                                     stderr=subprocess.PIPE, text=True)))
        elif self.sample_dir is not None and (targets := [t for t in targets if t[1] in ROLES]):
            self.method, self.error = "stack_sampler", why
            for pid, _ in targets:
                (self.sample_dir / f"{pid}.json").unlink(missing_ok=True)
            flag = self.sample_dir / "on"
            flag.touch()
            self._sampled = targets
            self._stop.wait(self.seconds)
            flag.unlink(missing_ok=True)
        else:
            self.error = why

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.delay_s + 5)
        results = self._pyspy_results() if self.method == "py-spy" else self._sampler_results()
        if not results:
            return {"error": self.error or "no replica, ingress or engine-core process found"}
        out = {"method": self.method, "delay_s": self.delay_s, "seconds": self.seconds, "processes": results}
        if self.method == "py-spy":
            out.update(rate_hz=self.rate_hz, idle=self.idle)
        elif self.error:
            out["py_spy"] = self.error
        return out

    def _pyspy_results(self) -> list[dict[str, Any]]:
        results = []
        deadline = time.monotonic() + self.seconds + 30
        for pid, role, out, proc in self._procs:
            try:
                _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            entry: dict[str, Any] = {"pid": pid, "role": role, "file": out.name, "rc": proc.returncode}
            if out.is_file():
                entry.update(summarize(out.read_text()))
            else:
                entry["error"] = (err or "").strip()[-300:]
            results.append(entry)
        return results

    def _sampler_results(self) -> list[dict[str, Any]]:
        results = []
        deadline = time.monotonic() + 10  # each sampler writes within ~0.25 s of the flag going
        for pid, role in self._sampled:
            path = self.sample_dir / f"{pid}.json"
            while not path.is_file() and time.monotonic() < deadline:
                time.sleep(0.1)
            entry: dict[str, Any] = {"pid": pid, "role": role}
            if path.is_file():
                body = json.loads(path.read_text())
                kept = self.out_dir / f"{self.label}-{role}-{pid}.stacks.json"
                path.replace(kept)
                entry.update({"file": kept.name, "thread_cpu_s": body.get("thread_cpu_s", {}),
                              **summarize("\n".join(f"{stack} {n}" for stack, n in body.get("stacks", [])))})
            else:
                entry["error"] = "no samples written (the sampler is not installed in this process?)"
            results.append(entry)
        return results


def _cannot_attach(exe: str, pid: int) -> str | None:
    """Why py-spy cannot read ``pid`` (None: it can), from one ``py-spy dump``."""
    try:
        done = subprocess.run([exe, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True,
                              timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"py-spy dump: {err}"
    return None if done.returncode == 0 else f"py-spy dump rc {done.returncode}: {done.stderr.strip()[-200:]}"
