"""freeze_startup_heap: what the process allocated so far leaves the collector's view, and a full
collection no longer walks it; unfrozen at exit."""

from __future__ import annotations

import atexit
import gc

import pytest
import vllm.utils.gc_utils  # noqa: F401  (imported before atexit.register is patched: its own handlers stay real)

from deployments import heap

pytestmark = pytest.mark.unit


def test_startup_objects_are_frozen_and_a_full_collection_skips_them(monkeypatch):
    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    heap._unfreeze_at_exit.cache_clear()
    suite_frozen = gc.get_freeze_count()  # tests/conftest.py freezes what collection allocated
    startup = [[i] for i in range(50_000)]  # long-lived (tracked) objects allocated before the freeze
    try:
        frozen = heap.freeze_startup_heap("test")
        assert frozen >= suite_frozen + len(startup) and gc.get_freeze_count() >= suite_frozen + len(startup)
        assert gc.is_tracked(startup[0]) and len(gc.get_objects(generation=2)) < len(startup)
        heap.freeze_startup_heap("test")  # again: one unfreeze at exit, not two
        assert registered == [gc.unfreeze]
    finally:
        gc.unfreeze()
        unfrozen = gc.get_freeze_count()
        heap._unfreeze_at_exit.cache_clear()
        if suite_frozen:
            gc.freeze()  # the suite's own frozen heap, as it was
    assert unfrozen == 0
