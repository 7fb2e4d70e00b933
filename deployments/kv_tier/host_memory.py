"""Page-locking object-store memory so a GPU load can DMA straight from plasma.

Owns: ``HostRegistrar`` (``cuMemHostRegister``/``cuMemHostUnregister`` through ctypes),
``plasma_ranges`` and ``page_interior``. Imports neither ray nor torch.

Three ways a loaded chunk reaches the GPU (``KVTierConfig.host_dma``):

- ``staged``: memcpy from plasma into a pinned slot, then H2D. The memcpy faults in and copies
  every page on the CPU: 7-9 GB/s per loader thread on the H100.
- ``per_chunk``: register the chunk's whole pages, DMA, unregister. Registering costs ~50 ms/GiB
  for pages that exist, paid on every load; the second H100 run loaded at 4.1 GB/s this way
  (``benchmarks/results/kv_tier_h100.json``).
- ``mapping``: register every mapping of the object store in this process once
  (``register_ranges(plasma_ranges())``), then every chunk inside it is DMA'd with no per-load
  cost. On the H100, registered plasma DMA'd at 50-54 GB/s; registering 24 GiB took 13.5 s cold /
  1.2 s warm. The cost is paid once per engine process, off the engine's thread, and pins the
  object store's pages (shared memory: processes pinning the same pages do not add up).

Measured on the H200 (``benchmarks/results/kv_transfer_micro_h200.json``: 1 GiB of 8B-shaped
chunks into scattered blocks, 32 MiB chunks, best thread count): ``mapping`` 49.9 GB/s (2 threads),
``staged`` 25.5 GB/s (2 threads), ``per_chunk`` 5.4 GB/s, a plain pageable copy 8.0 GB/s.
Registering the 40 GiB store took 20.3 s the first time (the pages are faulted in) and 1.4 s
after; in an engine (``kv_tier_h200.json``) 23-25 s, in the background. Hence ``mapping``.

Only whole pages are registered (plasma objects are 64-byte aligned, so two chunks can share a
page, and two loader threads registering overlapping ranges would fail). Driver API via ctypes:
a failure never leaves a sticky runtime error for torch to trip over later.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import mmap
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

_PAGE = mmap.PAGESIZE
_MIN_REGISTER_BYTES = 1 << 20  # below this the pinned-slot memcpy is as fast as registering
_CU_MEMHOSTREGISTER_PORTABLE = 0x01
_CU_MEMHOSTREGISTER_READ_ONLY = 0x08


def plasma_ranges(maps: str | None = None) -> list[tuple[int, int]]:
    """``(start, end)`` of this process's mappings of Ray's object store, from ``/proc/self/maps``
    (the store's backing files are named ``plasma*``, in /dev/shm or the fallback directory)."""
    text = Path("/proc/self/maps").read_text() if maps is None else maps
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 6 and Path(parts[5]).name.startswith("plasma"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return sorted(out)


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
        self._held: list[tuple[int, int]] = []  # whole ranges registered by register_ranges, sorted
        self._held_lock = threading.Lock()
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
        if not self._has_context():
            return None  # no current context in this thread (the caller makes a runtime call first)
        rc, rc2 = self._page_lock(ptr + lo, hi - lo)
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

    def register_ranges(self, ranges: list[tuple[int, int]]) -> int:
        """Register whole ranges (page-aligned, e.g. ``plasma_ranges()``) and keep them registered;
        ranges already held are skipped. Returns the bytes newly registered. Needs a current CUDA
        context in the calling thread."""
        if not self.enabled or not self._has_context():
            return 0
        added = 0
        for lo, hi in ranges:
            if self.covers(lo, hi - lo):
                continue
            _, rc = self._page_lock(lo, hi - lo)
            if rc != 0:
                logger.warning("kv tier: cuMemHostRegister of %d MiB of the object store failed (CUresult %d)",
                               (hi - lo) >> 20, rc)
                continue
            with self._held_lock:
                bisect.insort(self._held, (lo, hi))
            added += hi - lo
        return added

    def covers(self, ptr: int, nbytes: int) -> bool:
        """Whether ``[ptr, ptr+nbytes)`` lies inside one range held by ``register_ranges``."""
        with self._held_lock:
            i = bisect.bisect_right(self._held, (ptr, float("inf"))) - 1
            return i >= 0 and self._held[i][0] <= ptr and ptr + nbytes <= self._held[i][1]

    def release_ranges(self) -> None:
        """Unregister every range held by ``register_ranges``."""
        with self._held_lock:
            held, self._held = self._held, []
        for lo, _ in held:
            self.unregister(lo, 0)

    @property
    def held_bytes(self) -> int:
        """Bytes kept registered by ``register_ranges``."""
        with self._held_lock:
            return sum(hi - lo for lo, hi in self._held)

    def _has_context(self) -> bool:
        """Whether this thread has a current CUDA context (the driver calls need one)."""
        ctx = ctypes.c_void_p()
        return self._ctx(ctypes.byref(ctx)) == 0 and bool(ctx.value)

    def _page_lock(self, addr: int, nbytes: int) -> tuple[int, int]:
        """``cuMemHostRegister`` portable, then portable + read-only if that fails (plasma mappings a
        process only reads). Returns both CUresults; the second is 0 when either call succeeded."""
        rc = self._reg(addr, nbytes, _CU_MEMHOSTREGISTER_PORTABLE)
        if rc == 0:
            return 0, 0
        return rc, self._reg(addr, nbytes, _CU_MEMHOSTREGISTER_PORTABLE | _CU_MEMHOSTREGISTER_READ_ONLY)

    def unregister(self, ptr: int, lo: int) -> None:
        rc = self._unreg(ptr + lo)
        if rc != 0:
            logger.warning("kv tier: cuMemHostUnregister failed (CUresult %d)", rc)
