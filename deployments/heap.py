"""The garbage collector's view of a serving process: its startup heap frozen once it is up.

Owns ``freeze_startup_heap``. A replica or ingress process imports vLLM, torch, transformers and Ray
Serve: ~640K objects tracked by the cycle collector that live as long as the process. Every full
(oldest-generation) collection walks them all, on whatever thread triggered it, which in these
processes is the asyncio loop that streams tokens and takes requests: a stall per collection
(``benchmarks/gc_pause.py`` measures it). vLLM's own API server and engine core freeze their startup heap
for this reason (``vllm.utils.gc_utils.freeze_gc_heap``: collect, then ``gc.freeze``); kvserve's processes
call the same after their startup. Frozen objects are still freed by reference counting; at exit the heap
is unfrozen so that shutdown frees everything (frozen objects never are, and triton's nanobind modules
then report leaks).
"""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import time

logger = logging.getLogger(__name__)


@functools.cache
def _unfreeze_at_exit() -> None:
    atexit.register(gc.unfreeze)


def freeze_startup_heap(owner: str) -> int:
    """Freeze what the process allocated so far (vLLM's ``freeze_gc_heap``); returns the objects frozen."""
    from vllm.utils.gc_utils import freeze_gc_heap

    t0 = time.perf_counter()
    freeze_gc_heap()
    _unfreeze_at_exit()
    frozen = gc.get_freeze_count()
    logger.info("%s: %d startup objects frozen out of the garbage collector in %.0f ms", owner, frozen,
                (time.perf_counter() - t0) * 1000)
    return frozen
