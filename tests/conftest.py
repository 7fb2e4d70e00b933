"""Garbage collection around the test session.

Collection imports vLLM, torch, transformers and Ray Serve: about a million objects that live to the
end, which every full collection (pytest's final ``gc.collect()`` calls too) would walk again.
Collection therefore runs without the cycle collector, and what it allocated is then frozen out of
the collector's view (``gc.freeze``); the tests' own garbage is collected as usual. Unfrozen at exit,
so that shutdown still frees every object (frozen ones never are, and nanobind modules such as
triton's then report leaks).
"""

from __future__ import annotations

import atexit
import gc

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session: pytest.Session):
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
        atexit.register(gc.unfreeze)
