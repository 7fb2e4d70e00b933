"""Object store -> paged device KV without a vLLM engine: GB/s of each way the KV tier could load a hit.

Owns the KV tier's transfer microbenchmark (ray, torch and the tier's own modules, no engine; seconds per
variant). It puts chunks of the tier's object layout (a ``uint8`` array ``(layers, blocks, page_bytes)`` per
chunk, as ``Storer`` writes them) into
Ray's object store, then loads all of them into a paged device tensor per layer at scattered block ids (as a
prefix hit lands in a running engine's cache) and reports GB/s per cell: variant, chunk size, thread count,
background contention and the interpreter's switch interval. Variants:

  pageable        ``ray.get`` (zero-copy view of plasma) -> ``.to(device)`` from pageable memory
  pinned_ring     each thread copies the chunk into its own pinned slot (a ring of slots per thread), then
                  H2D from the slot on the thread's stream, overlapping the next chunk's memcpy
  register_chunk  ``cuMemHostRegister`` the chunk's plasma pages, H2D straight from plasma, unregister
                  (the tier's ``host_dma: per_chunk``; the registration is paid per chunk)
  register_once   register the process's whole plasma mapping once (its cost is reported on its own), then
                  H2D straight from plasma with no per-chunk registration (the tier's ``host_dma: mapping``,
                  through the same ``HostRegistrar.register_ranges`` and ``plasma_ranges``)
  register_once_direct  as register_once, but H2D straight into the pages (``pages.scatter_runs`` from the
                  plasma view: one ``_foreach_copy_`` per chunk) when the destination forms a few runs of
                  consecutive blocks (``--dst runs``), else the register_once path (the tier's direct load before
                  ``pages.scatter_many``: the tier now issues one call per load, which ``loader`` runs)
  loader          the tier's own ``deployments.kv_tier.load.Loader`` (``--loader-host-dma``, ``mapping`` by
                  default: it page-locks the store itself, in its background thread, timed in
                  ``loader_registration``), ``threads`` = its ``load_threads``; the cell's chunks are split
                  into ``--loads`` requests submitted at once, run ``--parallel-loads`` at a time (its
                  ``KVTierConfig.parallel_loads``; a comma list: one cell each; default: the config's). A fake
                  directory answers ``locate`` with ``ChunkLocation`` s of the put chunks through the object
                  store; each cell carries the loads' ``LoadRecord`` s (queue/locate/get/copy ms, direct and
                  into-pages chunk counts) and the copy phase's GB/s.

The other variants end the same way: the chunk's bytes land in a device slot of the thread's stream, then one
``index_copy_`` per layer scatters the blocks into the pages. The loaded pages are checked against what was
stored (each chunk is filled with its own byte value). Threads run one chunk at a time each, like the tier's
``Loader``; the wall time covers ``ray.get`` through the last stream's synchronisation.

Contention (``--contention``, a comma list of ``none``, ``gil``, ``compute``, ``d2h``, ``+``-joined mixes such
as ``gil+d2h``, or ``all``) runs in background threads during each timed repetition only (not the checks), to
test why the tier's copies slow down inside a busy engine:

  gil      a thread spinning in pure-Python bytecode (an engine's busy loop): a loader thread returning from a
           blocking call (CUDA, ``ray.get``) waits up to the switch interval for the GIL
  compute  back-to-back ``(--matmul-n)^2`` bf16 matmuls on the default stream (forward passes), at most two
           batches of 4 queued; on CPU, float32 matmuls (threads of torch's pool)
  d2h      a thread copying ``--d2h-mib`` device -> pinned host on its own stream, one copy after another (the
           store path sharing PCIe); on CPU, memcpy between two host buffers
Each cell reports what the contention threads achieved (``contention_rates``: GIL loops/s, matmul TFLOP/s,
D2H GB/s), so an idle contender is visible. ``--switch-interval-ms`` (a comma list; default: the interpreter's,
5 ms) sets ``sys.setswitchinterval`` in this process for the cells after it: the GIL hypothesis directly.

GPU machine (after the wheel set is installed, see benchmarks/gpu/run_on_device.sh):
    python3 benchmarks/gpu/kv_transfer_micro.py --out /tmp/res/kv_transfer_micro.json --git-commit SHA
    python3 benchmarks/gpu/kv_transfer_micro.py --variants register_once_direct,loader --dst runs \\
        --chunk-mib 32 --threads 2 --total-mib 1536 --contention none,gil,compute,d2h,all \\
        --switch-interval-ms 5,0.5 --object-store-gib 8 --out /tmp/res/kv_transfer_contention.json --git-commit SHA
This machine (a smoke run of the plumbing on CPU tensors; no pinned memory, no registration; Ray starts, so
under ``flock /tmp/kvserve-ray.lock``):
    python benchmarks/gpu/kv_transfer_micro.py --device cpu --total-mib 64 --chunk-mib 8 --threads 1,2 \\
        --variants pageable,loader --contention none,gil --out /tmp/kv_transfer_micro_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from serve_app.config.kv_tier import KVTierConfig

VARIANTS = ("pageable", "pinned_ring", "register_chunk", "register_once", "register_once_direct", "loader")


class Worker:
    """One loader thread's resources: a stream, a device slot, pinned host slots (ring)."""

    def __init__(self, torch, device: str, nbytes: int, ring: int, pinned: bool) -> None:
        cuda = device.startswith("cuda")
        self.stream = torch.cuda.Stream(device=device) if cuda else None
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned and cuda) for _ in range(ring)]
        self.events = [torch.cuda.Event() if cuda else None for _ in range(ring)]
        self.next = 0


def load_chunk(torch, variant: str, arr, dst_ids, pages, w: Worker, registrar, dst_list=None) -> None:
    """Bring one chunk (numpy view of plasma) into the pages at ``dst_ids`` (a device long tensor;
    ``dst_list`` the same ids as a list)."""
    from deployments.kv_tier.pages import scatter_runs

    layers, n, page = arr.shape
    nbytes = arr.nbytes
    src = torch.from_numpy(arr).view(-1)
    ctx = torch.cuda.stream(w.stream) if w.stream is not None else contextlib.nullcontext()
    with ctx, torch.inference_mode():
        dev = w.dev[:nbytes]
        if variant == "register_once_direct" and scatter_runs(
                pages.layers, torch.from_numpy(arr), list(range(n)), dst_list, non_blocking=True):
            return  # the worker's stream is synchronised at the end of the cell, before plasma is released
        if variant == "pinned_ring":
            i = w.next
            w.next = (i + 1) % len(w.host)
            if w.events[i] is not None:
                w.events[i].synchronize()  # the slot's previous H2D is done
            w.host[i][:nbytes].copy_(src)
            dev.copy_(w.host[i][:nbytes], non_blocking=True)
            if w.events[i] is not None:
                w.events[i].record(w.stream)
        elif variant == "register_chunk" and registrar is not None:
            ptr = arr.ctypes.data
            got = registrar.register(ptr, nbytes)
            dev.copy_(src, non_blocking=True)
            if got is not None:
                w.stream.synchronize()  # the DMA must end before the pages are unlocked
                registrar.unregister(ptr, got[0])
        else:  # pageable, register_once (plasma already registered), register_chunk without CUDA
            dev.copy_(src, non_blocking=True)
        chunk = dev.view(layers, n, page)
        for layer in range(layers):
            pages.layers[layer].index_copy_(0, dst_ids, chunk[layer])
    if variant == "pageable" and w.stream is not None:
        w.stream.synchronize()  # its source may be freed as soon as this returns


def run_cell(torch, ray, variant: str, refs: list, dst: list, pages, threads: int, chunk_bytes: int,
             device: str, registrar, dst_lists: list) -> float:
    """Load every chunk once with ``threads`` loader threads; return the wall seconds."""
    workers = [Worker(torch, device, chunk_bytes, ring=2, pinned=variant == "pinned_ring") for _ in range(threads)]
    todo = list(range(len(refs)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def loop(w: Worker) -> None:
        try:
            if device.startswith("cuda"):
                torch.cuda.set_device(torch.device(device))
            while True:
                with lock:
                    if not todo:
                        break
                    k = todo.pop()
                arr = ray.get(refs[k])
                load_chunk(torch, variant, arr, dst[k], pages, w, registrar, dst_lists[k])
            if w.stream is not None:
                w.stream.synchronize()
        except BaseException as err:  # noqa: BLE001 - re-raised by the caller
            errors.append(err)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=loop, args=(w,)) for w in workers]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall


# ---- the tier's own Loader ------------------------------------------------------------------------------------
class _Remote:
    """``actor.method`` as the Loader calls it: ``.remote(*args)``."""

    def __init__(self, fn) -> None:
        self.remote = fn


def chunk_key(k: int, i: int) -> bytes:
    """The fake tier key of block ``i`` of chunk ``k`` (32 bytes, like a real key)."""
    return k.to_bytes(4, "big") + i.to_bytes(4, "big") + bytes(24)


class FakeDirectory:
    """The directory actor as the ``Loader`` sees it: ``locate.remote(keys)`` returns an object ref (through
    the object store, as an actor's reply would) of the ``ChunkLocation`` s of the put chunks; ``note_load``
    keeps the ``LoadRecord`` s, ``note_host_dma`` the mapping's registrations; drops are no-ops."""

    def __init__(self, ray, refs: list) -> None:
        self.ray, self.refs = ray, refs
        self.records: list = []
        self.host_dma: list[tuple] = []
        self.locate = _Remote(self._locate)
        self.note_load = _Remote(self.records.append)
        self.note_host_dma = _Remote(lambda *a: self.host_dma.append(a))
        self.drop_chunk = self.drop_owner = _Remote(lambda *a: None)

    def locations(self, keys: list[bytes]) -> list:
        from deployments.kv_tier.directory import ChunkLocation

        groups: dict[int, tuple[list[int], list[int]]] = {}
        for pos, key in enumerate(keys):
            src, where = groups.setdefault(int.from_bytes(key[:4], "big"), ([], []))
            src.append(int.from_bytes(key[4:8], "big"))
            where.append(pos)
        return [ChunkLocation(self.refs[k], k, "bench", tuple(src), tuple(where))
                for k, (src, where) in groups.items()]

    def _locate(self, keys: list[bytes]):
        return self.ray.put(self.locations(keys))


def make_loader(pages, directory: FakeDirectory, per_chunk: int, threads: int, host_dma: str,
                parallel_loads: int):
    """A ``Loader`` over the pages; waits for its background registration of the object store (if any).
    Returns the loader and that registration as ``{"seconds", "registered_bytes"}`` (None if there was none)."""
    from deployments.kv_tier.load import Loader

    loader = Loader(pages, directory, per_chunk, threads, 60.0, {"bench": "kv_transfer_micro"}, host_dma=host_dma,
                    parallel_loads=parallel_loads)
    if not loader.wait_registered(600):  # started in the constructor
        raise TimeoutError("the Loader's registration of the object store did not finish in 600 s")
    if not directory.host_dma:
        return loader, None
    _, added, seconds = directory.host_dma[-1]
    return loader, {"seconds": round(seconds, 3), "registered_bytes": added}


def split_loads(n_chunks: int, loads: int, per_chunk: int, dst_lists: list) -> list[tuple[list[int], list[bytes]]]:
    """The cell's chunks as ``loads`` requests of consecutive chunks: ``(block_ids, keys)`` each."""
    loads = max(1, min(loads, n_chunks))
    bounds = [n_chunks * j // loads for j in range(loads + 1)]
    out = []
    for a, b in itertools.pairwise(bounds):
        ids = [d for k in range(a, b) for d in dst_lists[k]]
        keys = [chunk_key(k, i) for k in range(a, b) for i in range(per_chunk)]
        out.append((ids, keys))
    return out


def run_loader_cell(loader, loads: list[tuple[list[int], list[bytes]]]) -> float:
    """Submit every load at once (the Loader's coordinator threads take ``parallel_loads`` at a time), wait
    until each is reported; return the wall seconds."""
    t0 = time.perf_counter()
    futs = [loader.submit(f"bench-{j}", ids, keys) for j, (ids, keys) in enumerate(loads)]
    for f in futs:
        f.result()  # done after the load was reported (take_finished has it)
    wall = time.perf_counter() - t0
    reqs, bad = loader.take_finished()
    if bad or len(reqs) != len(loads):
        raise AssertionError(f"loader: {len(reqs)} of {len(loads)} loads reported, {len(bad)} blocks failed")
    return wall


def summarize_records(records: list) -> dict:
    """Per-load phases of the loader's ``LoadRecord`` s: means, the copy phase's GB/s, the path counts."""
    from deployments.kv_tier.directory import LOAD_PHASES

    if not records:
        return {}
    copy_gbps = [r.nbytes / r.copy_ms / 1e6 for r in records if r.copy_ms > 0]
    return {"loads": len(records),
            "ms_mean": {"total": round(statistics.fmean(r.ms for r in records), 3),
                        **{p: round(statistics.fmean(getattr(r, f"{p}_ms") for r in records), 3)
                           for p in LOAD_PHASES}},
            "copy_gbps_median": round(statistics.median(copy_gbps), 2) if copy_gbps else None,
            "direct_chunks": sum(r.direct_chunks for r in records),
            "into_pages": sum(r.into_pages for r in records),
            "failed_blocks": sum(r.failed_blocks for r in records),
            "records": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.as_dict().items()}
                        for r in records]}


# ---- background contention ------------------------------------------------------------------------------------
CONTENTIONS = ("gil", "compute", "d2h")


def parse_contention(spec: str) -> list[tuple[str, ...]]:
    """``none,gil,compute+d2h,all`` -> ``[(), ("gil",), ("compute", "d2h"), ("gil", "compute", "d2h")]``."""
    out = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        if item == "none":
            out.append(())
            continue
        kinds = CONTENTIONS if item == "all" else tuple(item.split("+"))
        bad = [k for k in kinds if k not in CONTENTIONS]
        if bad:
            raise ValueError(f"unknown contention {', '.join(bad)}; known: none, all, {', '.join(CONTENTIONS)}")
        out.append(tuple(k for k in CONTENTIONS if k in kinds))
    return out


def contention_name(kinds: tuple[str, ...]) -> str:
    return "+".join(kinds) if kinds else "none"


class Contention:
    """Background threads that load the process like a busy engine does, started and stopped around each timed
    repetition (see the module docstring for the kinds). Buffers are allocated once."""

    def __init__(self, torch, device: str, kinds: set[str], matmul_n: int, d2h_mib: int) -> None:
        self.torch, self.device, self.cuda = torch, device, device.startswith("cuda")
        self.n = matmul_n if self.cuda else min(matmul_n, 512)
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self.counts = dict.fromkeys(CONTENTIONS, 0)
        if "compute" in kinds:
            dtype = torch.bfloat16 if self.cuda else torch.float32
            self.mats = [torch.randn(self.n, self.n, dtype=dtype, device=device) for _ in range(3)]
        if "d2h" in kinds:
            nbytes = d2h_mib * 1024**2
            self.d2h_src = torch.ones(nbytes, dtype=torch.uint8, device=device)
            self.d2h_dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

    def start(self, kinds: tuple[str, ...]) -> None:
        self._stop.clear()
        self.counts = dict.fromkeys(CONTENTIONS, 0)
        self._t0 = time.perf_counter()
        self._threads = [threading.Thread(target=self._run, args=(k,), name=f"contention-{k}", daemon=True)
                         for k in kinds]
        for t in self._threads:
            t.start()
        if kinds:
            time.sleep(0.05)  # the contenders are running (the matmul queue is full) before the cell starts

    def stop(self) -> dict[str, float]:
        """Stop the threads; returns what they did per second (GIL loops, matmul TFLOP/s, D2H GB/s)."""
        self._stop.set()
        for t in self._threads:
            t.join()
        secs = time.perf_counter() - self._t0
        if self._errors:
            raise self._errors[0]
        kinds = [t.name.removeprefix("contention-") for t in self._threads]
        rates = {"gil": ("gil_loops_per_s", self.counts["gil"] / secs),
                 "compute": ("matmul_tflops", self.counts["compute"] * 2 * self.n**3 / secs / 1e12),
                 "d2h": ("d2h_gbps", self.counts["d2h"] / secs / 1e9)}
        return {rates[k][0]: float(f"{rates[k][1]:.3g}") for k in kinds}

    def _run(self, kind: str) -> None:
        try:
            if self.cuda and kind != "gil":
                self.torch.cuda.set_device(self.torch.device(self.device))
            getattr(self, f"_{kind}")()
        except BaseException as err:  # noqa: BLE001 - re-raised by stop()
            self._errors.append(err)

    def _gil(self) -> None:
        """Pure-Python bytecode: holds the GIL except when the interpreter's switch interval forces a hand-off."""
        while not self._stop.is_set():
            acc = 0
            for i in range(1000):
                acc += i * i
            self.counts["gil"] += 1

    def _compute(self) -> None:
        """Back-to-back matmuls on the default stream, at most two batches of 4 in flight (the waits release
        the GIL, as an engine's step does while its forward pass runs)."""
        torch = self.torch
        a, b, c = self.mats
        events = [torch.cuda.Event(), torch.cuda.Event()] if self.cuda else None
        i = 0
        with torch.inference_mode():
            while not self._stop.is_set():
                for _ in range(4):
                    torch.mm(a, b, out=c)
                    self.counts["compute"] += 1
                if events is not None:
                    events[i % 2].record()
                    i += 1
                    events[i % 2].synchronize()  # the batch before the last one is done
            if self.cuda:
                torch.cuda.current_stream().synchronize()

    def _d2h(self) -> None:
        """One ``--d2h-mib`` copy device -> pinned host after another, on this thread's stream."""
        torch = self.torch
        stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx, torch.inference_mode():
            while not self._stop.is_set():
                self.d2h_dst.copy_(self.d2h_src, non_blocking=self.cuda)
                if stream is not None:
                    stream.synchronize()
                self.counts["d2h"] += self.d2h_src.numel()


def check(torch, pages, ids, expected) -> None:
    """Every loaded block (``ids``) holds its chunk's byte value (``expected``) in the first and last layer (first
    and last byte of the page); then the blocks are zeroed (and the device synchronised) for the next repetition."""
    for layer in (pages.layers[0], pages.layers[-1]):
        got = layer.index_select(0, ids)
        if not (bool((got[:, 0] == expected).all()) and bool((got[:, -1] == expected).all())):
            bad = int((got[:, 0] != expected).sum() + (got[:, -1] != expected).sum())
            raise AssertionError(f"{bad} wrong bytes in the loaded pages")
    for layer in pages.layers:
        layer.index_fill_(0, ids, 0)
    if ids.is_cuda:  # the zeroing runs on the default stream, the next loads on their own: order them
        torch.cuda.synchronize(ids.device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--layers", type=int, default=32, help="Llama-3.1-8B: 32")
    p.add_argument("--page-bytes", type=int, default=65536, help="one block of one layer: 16 x 8 x 128 x 2 x bf16")
    p.add_argument("--num-blocks", type=int, default=4096, help="blocks per layer of the paged device tensor")
    p.add_argument("--total-mib", type=int, default=1024, help="bytes loaded per cell (1 GiB = an 8K-token prefix)")
    p.add_argument("--chunk-mib", default="8,32,128")
    p.add_argument("--threads", default="1,2,4,8", help="loader threads (for `loader`: its load_threads)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dst", choices=["random", "runs"], default="random",
                   help="destination blocks: scattered one by one, or one run of consecutive blocks per chunk")
    p.add_argument("--contention", default="none",
                   help="comma list of none, gil, compute, d2h, `+`-joined mixes (gil+d2h) or all")
    p.add_argument("--switch-interval-ms", default="",
                   help="comma list of sys.setswitchinterval values (ms) to run every cell under; "
                        "default: the interpreter's")
    p.add_argument("--loads", type=int, default=2,
                   help="`loader`: requests the cell's chunks are split into, submitted at once")
    p.add_argument("--parallel-loads", default=str(KVTierConfig.model_fields["parallel_loads"].default),
                   help="`loader`: comma list of KVTierConfig.parallel_loads (loads in flight), one cell each")
    p.add_argument("--loader-host-dma", choices=["staged", "per_chunk", "mapping"], default="mapping",
                   help="`loader`: KVTierConfig.host_dma")
    p.add_argument("--matmul-n", type=int, default=8192, help="`compute` contention: square bf16 matmul size")
    p.add_argument("--d2h-mib", type=int, default=32, help="`d2h` contention: bytes per copy")
    p.add_argument("--object-store-gib", type=float, default=16)
    p.add_argument("--git-commit", default="unknown")
    args = p.parse_args()

    import numpy as np
    import ray
    import torch

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # plasma views: read only

    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    try:
        contentions = parse_contention(args.contention)
    except ValueError as err:
        p.error(str(err))
    switches = [float(x) for x in args.switch_interval_ms.split(",") if x] or [None]
    cuda = args.device.startswith("cuda")
    notes = []
    if not cuda:
        variants = [v for v in variants if v in ("pageable", "pinned_ring", "register_once_direct", "loader")]
        notes.append("device cpu: no pinned memory or registration; `compute` contention is float32 CPU matmuls "
                     "(torch's intra-op threads), `d2h` a host-to-host memcpy")
    default_switch = sys.getswitchinterval()
    ray.init(num_cpus=max(os.cpu_count() or 1, 1), include_dashboard=False,
             object_store_memory=int(args.object_store_gib * 1024**3), log_to_driver=False)
    registrar = None
    if cuda:
        from deployments.kv_tier.host_memory import HostRegistrar, plasma_ranges

        torch.cuda.set_device(torch.device(args.device))
        torch.zeros(1, device=args.device)  # a current context for the driver-API calls
        registrar = HostRegistrar(enabled=True)
    from deployments.kv_tier.pages import KVPages  # the tier's own view of vLLM's paged cache

    pages = KVPages({f"layer.{i}": torch.zeros(args.num_blocks, args.page_bytes, dtype=torch.uint8, device=args.device)
                     for i in range(args.layers)})
    bg = Contention(torch, args.device, {k for kinds in contentions for k in kinds}, args.matmul_n, args.d2h_mib)
    block_bytes = args.layers * args.page_bytes
    result: dict = {"command": shlex.join([sys.executable, *sys.argv]), "git_commit": args.git_commit,
                    "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                                "torch": torch.__version__, "ray": ray.__version__,
                                "gpu": torch.cuda.get_device_name() if cuda else "none",
                                "switch_interval_default_ms": round(default_switch * 1e3, 3)},
                    "dst": args.dst,
                    "layout": {"layers": args.layers, "page_bytes": args.page_bytes, "block_bytes": block_bytes,
                               "total_bytes_per_cell": args.total_mib * 1024**2},
                    "contention": {"matmul_n": args.matmul_n, "d2h_mib": args.d2h_mib},
                    "notes": notes, "cells": []}
    rng = np.random.default_rng(0)
    for chunk_mib in (int(x) for x in args.chunk_mib.split(",")):
        per_chunk = max(1, chunk_mib * 1024**2 // block_bytes)
        n_chunks = max(1, args.total_mib * 1024**2 // (per_chunk * block_bytes))
        values = [1 + k % 250 for k in range(n_chunks)]
        refs = [ray.put(np.full((args.layers, per_chunk, args.page_bytes), v, dtype=np.uint8)) for v in values]
        if args.dst == "runs":  # each chunk lands in one run of consecutive blocks, runs in random order
            segs = rng.permutation(args.num_blocks // per_chunk)[:n_chunks]
            perm = np.concatenate([np.arange(g * per_chunk, (g + 1) * per_chunk) for g in segs])
        else:  # every block somewhere else (a fragmented free list)
            perm = rng.permutation(args.num_blocks)[: n_chunks * per_chunk]
        dst_lists = [perm[k * per_chunk:(k + 1) * per_chunk].tolist() for k in range(n_chunks)]
        dst = [torch.as_tensor(d, dtype=torch.long, device=args.device) for d in dst_lists]
        all_ids = torch.cat(dst)
        expected = torch.tensor(values, dtype=torch.uint8).repeat_interleave(per_chunk).to(args.device)
        nbytes = n_chunks * per_chunk * block_bytes
        for variant in variants:
            once = False
            if variant.startswith("register_once") and registrar is not None:
                # the whole mapping, for this variant only
                ranges = plasma_ranges()
                t0 = time.perf_counter()
                added = registrar.register_ranges(ranges)
                result.setdefault("register_once", []).append({
                    "chunk_mib": chunk_mib, "seconds": round(time.perf_counter() - t0, 3),
                    "mapped_bytes": sum(hi - lo for lo, hi in ranges), "registered_bytes": added,
                    "ranges": len(ranges)})
                print(json.dumps(result["register_once"][-1]), flush=True)
                result["plasma_maps"] = [ln for ln in Path("/proc/self/maps").read_text().splitlines()
                                         if "plasma" in ln]
                once = True
            parallel = [int(x) for x in args.parallel_loads.split(",")] if variant == "loader" else [None]
            for threads, parallel_loads in itertools.product((int(x) for x in args.threads.split(",")), parallel):
                loader = directory = None
                if variant == "loader":
                    directory = FakeDirectory(ray, refs)
                    loader, reg = make_loader(pages, directory, per_chunk, threads, args.loader_host_dma,
                                              parallel_loads)
                    result.setdefault("loader_registration", []).append(
                        {"chunk_mib": chunk_mib, "threads": threads, "parallel_loads": parallel_loads,
                         "host_dma": loader.host_dma, **(reg or {})})
                    print(json.dumps(result["loader_registration"][-1]), flush=True)
                    loads = split_loads(n_chunks, args.loads, per_chunk, dst_lists)
                    once_through = functools.partial(run_loader_cell, loader, loads)
                else:
                    once_through = functools.partial(
                        run_cell, torch, ray, variant, refs, dst, pages, threads, per_chunk * block_bytes,
                        args.device, registrar if variant == "register_chunk" else None, dst_lists)
                once_through()  # warm-up
                check(torch, pages, all_ids, expected)
                for switch_ms in switches:
                    if switch_ms is not None:
                        sys.setswitchinterval(switch_ms / 1e3)
                    for kinds in contentions:
                        walls, rates, records = [], [], []
                        for _ in range(args.repeat):
                            if directory is not None:
                                directory.records.clear()
                            bg.start(kinds)
                            try:
                                walls.append(once_through())
                            finally:
                                rates.append(bg.stop())
                            if directory is not None:
                                records.extend(directory.records)
                            check(torch, pages, all_ids, expected)
                        gbps = [nbytes / w / 1e9 for w in walls]
                        cell = {"variant": variant, "chunk_mib": round(per_chunk * block_bytes / 1024**2, 2),
                                "threads": threads, "contention": contention_name(kinds),
                                "switch_interval_ms": round(sys.getswitchinterval() * 1e3, 3),
                                "chunks": n_chunks, "bytes": nbytes,
                                "gbps": [round(g, 2) for g in gbps], "gbps_median": round(statistics.median(gbps), 2)}
                        if kinds:
                            cell["contention_rates"] = {k: float(f"{statistics.median(r[k] for r in rates):.3g}")
                                                        for k in rates[0]}
                        if variant == "loader":
                            cell["loader"] = {"host_dma": loader.host_dma, "loads_per_cell": len(loads),
                                              "parallel_loads": parallel_loads,
                                              **summarize_records(records)}
                        result["cells"].append(cell)
                        print(json.dumps({k: v for k, v in cell.items() if k != "loader"}
                                         | ({"loader": {k: v for k, v in cell["loader"].items() if k != "records"}}
                                            if "loader" in cell else {})), flush=True)
                        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
                sys.setswitchinterval(default_switch)
                if loader is not None:
                    loader.close()
            if once:
                registrar.release_ranges()
        del refs
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    best = max(result["cells"], key=lambda c: c["gbps_median"])
    print(f"best: {best['variant']} chunk {best['chunk_mib']} MiB x {best['threads']} threads "
          f"({best['contention']}, switch {best['switch_interval_ms']} ms): {best['gbps_median']} GB/s", flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
