"""The KV transfer microbenchmark's plumbing without Ray: contention specs, the loader variant over CPU pages.

The ``loader`` variant drives the tier's real ``Loader`` through the benchmark's ``FakeDirectory``; here the object
store is a fake too (refs resolve to the chunk arrays), so the test checks that the keys, locations and block ids
the benchmark builds make the Loader put every chunk's bytes where ``check`` expects them.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytestmark = pytest.mark.unit

torch = pytest.importorskip("torch")
pytest.importorskip("ray")

from benchmarks.gpu import kv_transfer_micro as micro
from deployments.kv_tier import load as load_mod
from deployments.kv_tier.directory import LOAD_PHASES
from deployments.kv_tier.pages import KVPages


class Ref:
    def __init__(self, value) -> None:
        self.value = value


class FakeRay:
    """``put``/``get`` of the object store: a ref holds its value."""

    exceptions = load_mod.ray.exceptions

    @staticmethod
    def put(value):
        return Ref(value)

    @staticmethod
    def get(ref, timeout=None):
        return [r.value for r in ref] if isinstance(ref, list) else ref.value


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    monkeypatch.setattr(load_mod, "ray", FakeRay)
    monkeypatch.setattr(load_mod, "inc", lambda *a: None)
    monkeypatch.setattr(load_mod, "observe", lambda *a: None)


def test_contention_specs():
    assert micro.parse_contention("none,gil,d2h+compute,all") == [
        (), ("gil",), ("compute", "d2h"), ("gil", "compute", "d2h")]
    assert [micro.contention_name(k) for k in micro.parse_contention("none,gil+d2h")] == ["none", "gil+d2h"]
    with pytest.raises(ValueError, match="unknown contention"):
        micro.parse_contention("gil,disk")


def test_split_loads_covers_every_chunk_once_in_order():
    dst_lists = [[10 * k + i for i in range(3)] for k in range(5)]
    loads = micro.split_loads(5, 2, 3, dst_lists)
    assert len(loads) == 2
    assert [d for ids, _ in loads for d in ids] == [d for ds in dst_lists for d in ds]
    assert all(len(ids) == len(keys) for ids, keys in loads)
    assert micro.split_loads(2, 8, 3, dst_lists[:2])[1][0] == dst_lists[1]  # never more loads than chunks


def test_loader_variant_loads_every_chunk_into_its_blocks_on_cpu():
    layers, per_chunk, n_chunks, page, num_blocks = 3, 4, 6, 16, 64
    values = [1 + k for k in range(n_chunks)]
    refs = [Ref(np.full((layers, per_chunk, page), v, dtype=np.uint8)) for v in values]
    perm = np.random.default_rng(1).permutation(num_blocks)[: n_chunks * per_chunk]
    dst_lists = [perm[k * per_chunk:(k + 1) * per_chunk].tolist() for k in range(n_chunks)]
    pages = KVPages({f"l{i}": torch.zeros(num_blocks, page, dtype=torch.uint8) for i in range(layers)})
    directory = micro.FakeDirectory(FakeRay, refs)
    loader, reg = micro.make_loader(pages, directory, per_chunk, threads=2, host_dma="mapping",
                                     parallel_loads=2)
    assert reg is None and loader.host_dma == "staged"  # CPU pages: no registration
    try:
        wall = micro.run_loader_cell(loader, micro.split_loads(n_chunks, 2, per_chunk, dst_lists))
    finally:
        loader.close()
    assert wall > 0
    ids = torch.as_tensor([d for ds in dst_lists for d in ds])
    expected = torch.tensor(values, dtype=torch.uint8).repeat_interleave(per_chunk)
    micro.check(torch, pages, ids, expected)  # raises on a wrong byte; zeroes the blocks
    assert all(int(layer.sum()) == 0 for layer in pages.layers)
    summary = micro.summarize_records(directory.records)
    assert summary["loads"] == 2 and summary["failed_blocks"] == 0
    assert set(summary["ms_mean"]) == {"total", *LOAD_PHASES}
    assert sum(r["nbytes"] for r in summary["records"]) == n_chunks * per_chunk * layers * page


def test_check_names_wrong_bytes():
    pages = KVPages({"l0": torch.zeros(4, 8, dtype=torch.uint8)})
    with pytest.raises(AssertionError, match="wrong bytes"):
        micro.check(torch, pages, torch.tensor([1, 2]), torch.tensor([5, 5], dtype=torch.uint8))


def test_cpu_contention_threads_run_and_report_rates():
    bg = micro.Contention(torch, "cpu", {"gil", "compute", "d2h"}, matmul_n=64, d2h_mib=1)
    bg.start(("gil", "compute", "d2h"))
    time.sleep(0.1)
    rates = bg.stop()
    assert set(rates) == {"gil_loops_per_s", "matmul_tflops", "d2h_gbps"}
    assert all(v > 0 for v in rates.values())
    bg.start(())
    assert bg.stop() == {}
