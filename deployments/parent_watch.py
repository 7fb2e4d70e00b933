"""Ending a vLLM engine process whose parent died: no EngineCore outlives its replica.

Owns ``register`` (kvserve's vLLM general plugin, ``vllm.general_plugins`` entry point ``kvserve_parent_watch``,
which vLLM runs in every process that loads plugins) and ``watch_parent``. In a process that ``multiprocessing``
started (vLLM's EngineCore, started by the replica's ``AsyncLLM``, and any worker it starts the same way) a daemon
thread waits for the parent to end (its ``multiprocessing`` sentinel, or the process re-parented); then it sends this
process SIGTERM, which vLLM's engine handles as a shutdown, and SIGKILL after ``grace_s`` if it still runs. In any
other process (a Serve replica, the ingress, a test, the CLI) it does nothing.

While Ray's raylet runs it ends a dead worker's process group, the engine core with it. When Ray's processes go
first (``ray stop --force`` kills them by name and vLLM's are not among them; the raylet killed by a signal to a
process group it shared), no one does: the engine core, re-parented, kept its memory, its GPU share included, until
killed by hand, since vLLM's engine core watches its workers, not its parent.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

GRACE_S = 10.0  # from the SIGTERM to the SIGKILL
POLL_S = 2.0  # how often the re-parenting check runs beside the sentinel's wait
_started = False


def register() -> None:
    """vLLM general plugin: watch the parent in this process if ``multiprocessing`` started it (once per process)."""
    global _started
    if not _started:
        try:
            _started = watch_parent()
        except Exception:  # a watch that cannot start must not take the engine down with it
            logger.exception("parent watch not started in process %s", os.getpid())
            _started = True


def watch_parent(grace_s: float = GRACE_S, poll_s: float = POLL_S,
                 on_death: Callable[[int], None] | None = None) -> bool:
    """Start the watch when this process is a ``multiprocessing`` child whose parent still runs; True if started.

    ``on_death(parent_pid)`` replaces ending this process (tests)."""
    parent = multiprocessing.parent_process()
    if parent is None or not parent.is_alive():
        return False
    ppid = os.getppid()

    def watch() -> None:
        from multiprocessing.connection import wait

        while not wait([parent.sentinel], timeout=poll_s) and os.getppid() == ppid:
            pass
        (on_death or (lambda pid: _end(pid, grace_s)))(parent.pid)

    threading.Thread(target=watch, name="kvserve-parent-watch", daemon=True).start()
    return True


def _end(parent_pid: int, grace_s: float = GRACE_S) -> None:
    logger.error("parent process %s ended; ending this process %s (%s)", parent_pid, os.getpid(),
                 multiprocessing.current_process().name)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)
