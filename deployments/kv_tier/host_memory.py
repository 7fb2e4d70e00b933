"""Page-locking object-store memory so a GPU load can DMA straight from plasma.

Owns: ``HostRegistrar`` (``cuMemHostRegister``/``cuMemHostUnregister`` through ctypes) and
``page_interior``. Imports neither ray nor torch.

Why. The first H100 run loaded at 8.3 GB/s through "memcpy into a pinned slot, then H2D" (the
notes: 7-9 GB/s per thread; the memcpy faults in every plasma page and then copies it on the
CPU), while registering plasma and DMA'ing it ran at 50-54 GB/s. So the loader's H2D copy can
read plasma directly: the chunk's page-aligned interior is page-locked with ``cuMemHostRegister``
(driver API through ctypes, so a failure never leaves a sticky runtime error for torch to trip
over later) and DMA'd at PCIe speed; the <4 KiB unaligned head and tail go through the driver's
pageable path. Registering costs ~50 ms/GiB for pages that already exist (a stored chunk's pages
always do), i.e. ~1.6 ms per 32 MiB chunk, done in the kernel with the GIL released, so 8 threads
overlap registration of one chunk with DMA of others. Registering per chunk (not the whole plasma
mapping once) keeps the cost proportional to what is loaded, pins nothing between loads, and
never pins the object store's unused pages (the whole 40 GiB mapping would take ~20 s and pin all
of it). The registration is undone after the copy's event, before the plasma view is released.
If registration fails (a mapping the driver refuses, the same chunk being loaded by two requests
at once), that chunk falls back to the memcpy-into-pinned-slot path; after repeated failures
registration is switched off for the process.

Measured since: the second H100 run loaded at 4.1 GB/s with registration per 32 MiB chunk
(``benchmarks/results/kv_tier_h100.json``), slower than the first run's pinned-slot path, so
``KVTierConfig.register_host_memory`` is off by default and the loader's registrar is then disabled.
"""

from __future__ import annotations

import ctypes
import logging
import mmap

logger = logging.getLogger(__name__)

_PAGE = mmap.PAGESIZE
_MIN_REGISTER_BYTES = 1 << 20  # below this the pinned-slot memcpy is as fast as registering
_CU_MEMHOSTREGISTER_PORTABLE = 0x01
_CU_MEMHOSTREGISTER_READ_ONLY = 0x08


def page_interior(ptr: int, nbytes: int, page: int = _PAGE) -> tuple[int, int]:
    """Offsets ``(lo, hi)`` of the whole pages inside ``[ptr, ptr + nbytes)`` (``lo == hi`` if none).

    Only whole pages are registered: plasma objects are 64-byte aligned, so two chunks can share
    a page, and registering overlapping ranges from two loader threads would fail.
    """
    lo = (-ptr) % page
    hi = ((ptr + nbytes) // page) * page - ptr
    return (lo, hi) if hi > lo else (0, 0)


class HostRegistrar:
    """Page-locks host ranges for direct DMA (``cuMemHostRegister``/``cuMemHostUnregister``).

    Driver API via ctypes (``libcuda.so.1``) rather than ``torch.cuda.cudart()``: a failed
    runtime call leaves the thread's last-error set and torch's next launch check would raise it;
    driver-API errors are only return codes. GIL released during the calls (ctypes).
    """

    MAX_FAILURES = 8

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registered = 0  # chunks DMA'd from registered plasma (for logs/tests)
        self._failures = 0
        if not enabled:
            return
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            self._reg = getattr(lib, "cuMemHostRegister_v2", None) or lib.cuMemHostRegister
            self._reg.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            self._reg.restype = ctypes.c_int
            self._unreg = lib.cuMemHostUnregister
            self._unreg.argtypes = [ctypes.c_void_p]
            self._unreg.restype = ctypes.c_int
            self._ctx = lib.cuCtxGetCurrent
            self._ctx.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
            self._ctx.restype = ctypes.c_int
        except (OSError, AttributeError) as err:
            logger.info("kv tier: no CUDA driver API (%s); loads copy through pinned slots", err)
            self.enabled = False

    def register(self, ptr: int, nbytes: int) -> tuple[int, int] | None:
        """Register the whole pages of ``[ptr, ptr+nbytes)``; returns their offsets, or None."""
        if not self.enabled:
            return None
        lo, hi = page_interior(ptr, nbytes)
        if hi - lo < _MIN_REGISTER_BYTES:
            return None
        ctx = ctypes.c_void_p()
        if self._ctx(ctypes.byref(ctx)) != 0 or not ctx.value:
            return None  # no current context in this thread (the caller makes a runtime call first)
        rc = self._reg(ptr + lo, hi - lo, _CU_MEMHOSTREGISTER_PORTABLE)
        if rc != 0:
            rc2 = self._reg(ptr + lo, hi - lo, _CU_MEMHOSTREGISTER_PORTABLE | _CU_MEMHOSTREGISTER_READ_ONLY)
            if rc2 != 0:
                self._failures += 1
                if self._failures >= self.MAX_FAILURES:
                    self.enabled = False
                    logger.warning("kv tier: cuMemHostRegister keeps failing (CUresult %d/%d); loads copy "
                                   "through pinned slots from now on", rc, rc2)
                return None
        self._failures = 0
        self.registered += 1
        return lo, hi

    def unregister(self, ptr: int, lo: int) -> None:
        rc = self._unreg(ptr + lo)
        if rc != 0:
            logger.warning("kv tier: cuMemHostUnregister failed (CUresult %d)", rc)
