"""benchmarks.stack_sampler: busy threads are sampled, parked ones are not, and thread CPU is read from /proc."""

from __future__ import annotations

import threading
import time
from collections import Counter

from benchmarks.stack_sampler import _sample, thread_cpu


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def test_samples_busy_threads_only():
    stop = threading.Event()
    busy = threading.Thread(target=_spin, args=(stop,), name="busy")
    parked = threading.Thread(target=stop.wait, name="parked")
    busy.start()
    parked.start()
    counts: Counter = Counter()
    try:
        for _ in range(20):
            _sample(counts, threading.get_ident())
            time.sleep(0.002)
        cpu = thread_cpu()
    finally:
        stop.set()
        busy.join()
        parked.join()
    leaves = {codes[0].co_name for codes in counts}
    assert "_spin" in {c.co_name for codes in counts for c in codes}
    assert "wait" not in leaves  # the parked thread sits in threading's wait: skipped
    assert "py:busy" in {name for name, _ in cpu.values()}
