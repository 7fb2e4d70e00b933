"""The tier's host-memory registration: finding the object store's mappings and covering chunks by them."""

from __future__ import annotations

from deployments.kv_tier import host_memory
from deployments.kv_tier.host_memory import HostRegistrar, page_interior, plasma_ranges

MAPS = """\
55d0c0000000-55d0c0021000 r--p 00000000 08:01 123 /usr/bin/python3.11
7f0000000000-7f0a00000000 rw-s 00000000 00:1a 77 /dev/shm/plasmaXk3a1b (deleted)
7f0b00000000-7f0b40000000 rw-s 00000000 00:2b 78 /tmp/ray/session_x/plasma_fallback_9 (deleted)
7f0c00000000-7f0c00001000 rw-p 00000000 00:00 0
7f0d00000000-7f0d00100000 r--p 00000000 08:01 99 /opt/notplasma/lib.so
"""


def test_plasma_ranges_reads_the_store_mappings_only():
    assert plasma_ranges(MAPS) == [(0x7F0000000000, 0x7F0A00000000), (0x7F0B00000000, 0x7F0B40000000)]
    assert plasma_ranges("") == []


def test_page_interior_keeps_whole_pages_only():
    assert page_interior(4096 + 64, 3 * 4096, page=4096) == (4096 - 64, 3 * 4096 - 64)
    assert page_interior(64, 100, page=4096) == (0, 0)


class Fn:
    """A C function stand-in: callable, and takes ``argtypes``/``restype`` as ctypes functions do."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


class FakeDriver:
    """libcuda's three entry points the registrar calls; records what was registered."""

    def __init__(self, fail_at: set[int] = frozenset()) -> None:
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []
        self.fail_at = fail_at
        self.cuMemHostRegister_v2 = Fn(self._reg)
        self.cuMemHostUnregister = Fn(self._unreg)
        self.cuCtxGetCurrent = Fn(self._ctx)

    def _reg(self, ptr, size, flags):
        if ptr in self.fail_at:
            return 2  # CUDA_ERROR_OUT_OF_MEMORY
        self.registered.append((ptr, size))
        return 0

    def _unreg(self, ptr):
        self.unregistered.append(ptr)
        return 0

    @staticmethod
    def _ctx(out):
        out._obj.value = 1  # a current context
        return 0


def registrar(monkeypatch, driver: FakeDriver) -> HostRegistrar:
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: driver)
    monkeypatch.setattr(host_memory.ctypes, "byref", lambda obj: type("Ref", (), {"_obj": obj})())
    return HostRegistrar(enabled=True)


def test_registered_ranges_cover_chunks_inside_them_and_are_registered_once(monkeypatch):
    drv = FakeDriver()
    reg = registrar(monkeypatch, drv)
    ranges = plasma_ranges(MAPS)
    assert reg.register_ranges(ranges) == 0xA00000000 + 0x40000000
    assert reg.register_ranges(ranges) == 0  # already held: nothing registered twice
    assert len(drv.registered) == 2 and reg.held_bytes == 0xA00000000 + 0x40000000
    lo, hi = ranges[0]
    assert reg.covers(lo, hi - lo) and reg.covers(lo + 12345, 1 << 25)
    assert not reg.covers(hi - 10, 20)  # runs past the end of the range
    assert not reg.covers(0x7F0C00000000, 16)  # outside every range
    assert not reg.covers(lo - 1, 2)
    reg.release_ranges()
    assert drv.unregistered == [r[0] for r in ranges] and not reg.covers(lo, 16) and reg.held_bytes == 0


def test_a_range_the_driver_refuses_is_not_covered(monkeypatch):
    ranges = plasma_ranges(MAPS)
    drv = FakeDriver(fail_at={ranges[1][0]})
    reg = registrar(monkeypatch, drv)
    assert reg.register_ranges(ranges) == ranges[0][1] - ranges[0][0]
    assert reg.covers(ranges[0][0], 4096) and not reg.covers(ranges[1][0], 4096)


def test_a_disabled_registrar_covers_nothing():
    reg = HostRegistrar(enabled=False)
    assert reg.register_ranges([(0, 1 << 30)]) == 0 and not reg.covers(0, 16)
