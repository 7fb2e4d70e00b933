"""An in-process stack sampler for a Ray actor that py-spy cannot attach to (no ptrace in this container).

Owns ``install`` (a Ray worker-process setup hook: ``__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR=
benchmarks.stack_sampler.install`` in the actor's ``runtime_env.env_vars``) and ``HOOK_ENV``. With
``KVSERVE_STACK_SAMPLE_DIR`` set, a daemon thread waits for ``<dir>/on``; while that file exists it samples
every other thread's Python stack each ``PERIOD_S`` (``sys._current_frames``), skipping threads parked in a
known wait (epoll, a lock or queue wait), and when the file goes away it writes ``<dir>/<pid>.json``:
collapsed stacks (py-spy's raw format, root first, no line numbers) and each thread's CPU seconds over the
sampled interval from ``/proc/self/task`` (which also shows the CPU of Ray's C++ threads, invisible to any
Python profiler). Samples are taken when the sampler gets the GIL, so they lean towards GIL switch points.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from benchmarks.routing_h2h.host_cpu import stat_ticks

HOOK_ENV = {"__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR": "benchmarks.stack_sampler.install"}
PERIOD_S = 0.005
#: (function, file suffix) of a thread's innermost frame that means it is waiting, not running.
_IDLE = {("select", "selectors.py"), ("wait", "threading.py"), ("_worker", "thread.py"), ("main_loop", "worker.py"),
         ("get", "queue.py"), ("_wait_for_tstate_lock", "threading.py")}
_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def install() -> None:
    from serve_app import settings

    directory = settings.get("KVSERVE_STACK_SAMPLE_DIR")
    if directory:
        threading.Thread(target=_run, args=(Path(directory),), name="kvserve-stack-sampler", daemon=True).start()


def thread_cpu() -> dict[int, tuple[str, float]]:
    """Native thread id -> (name, CPU seconds) of this process's threads: a Python thread's own name, else the
    kernel's (Ray's C++ threads name themselves)."""
    py_names = {t.native_id: f"py:{t.name}" for t in threading.enumerate()}
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name, ticks = stat_ticks((task / "stat").read_text())
        except OSError:
            continue
        tid = int(task.name)
        out[tid] = (py_names.get(tid, name), ticks * _TICK_S)
    return out


def _idle(code) -> bool:
    return any(code.co_name == name and code.co_filename.endswith(suffix) for name, suffix in _IDLE)


def _sample(counts: Counter, me: int) -> None:
    for tid, frame in sys._current_frames().items():
        if tid == me or _idle(frame.f_code):
            continue
        stack = []
        while frame is not None:
            stack.append(frame.f_code)
            frame = frame.f_back
        counts[tuple(stack)] += 1


def _write(path: Path, counts: Counter, cpu0: dict, cpu1: dict, seconds: float) -> None:
    stacks = [(";".join(f"{c.co_name} ({c.co_filename})" for c in reversed(codes)), n) for codes, n in counts.items()]
    threads: Counter[str] = Counter()
    for tid, (name, cpu) in cpu1.items():
        threads[name] += cpu - cpu0.get(tid, (name, 0.0))[1]
    body = {"pid": os.getpid(), "seconds": round(seconds, 3), "stacks": stacks,
            "thread_cpu_s": {k: round(v, 3) for k, v in threads.most_common()}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))
    tmp.replace(path)


def _run(directory: Path) -> None:
    me = threading.get_ident()
    flag, out = directory / "on", directory / f"{os.getpid()}.json"
    while True:
        while not flag.exists():
            time.sleep(0.1)
        counts: Counter = Counter()
        cpu0, t0, n = thread_cpu(), time.perf_counter(), 0
        while n == 0 or n % 50 or flag.exists():  # at least 50 samples: thread_cpu() may outlast a short window
            _sample(counts, me)
            n += 1
            time.sleep(PERIOD_S)
        _write(out, counts, cpu0, thread_cpu(), time.perf_counter() - t0)
