"""Object store -> paged device KV without a vLLM engine: GB/s of each way the KV tier could load a hit.

Owns the KV tier's transfer microbenchmark (ray + torch only; seconds per variant). It puts chunks of the tier's
object layout (a ``uint8`` array ``(layers, blocks, page_bytes)`` per chunk, as ``Storer`` writes them) into
Ray's object store, then loads all of them into a paged device tensor per layer at scattered block ids (as a
prefix hit lands in a running engine's cache) and reports GB/s per variant, chunk size and thread count:

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
                  consecutive blocks (``--dst runs``), else the register_once path (the tier's direct load)

Every variant ends the same way: the chunk's bytes land in a device slot of the thread's stream, then one
``index_copy_`` per layer scatters the blocks into the pages. The loaded pages are checked against what was
stored (each chunk is filled with its own byte value). Threads run one chunk at a time each, like the tier's
``Loader``; the wall time covers ``ray.get`` through the last stream's synchronisation.

GPU machine (after the wheel set is installed, see benchmarks/gpu/run_on_device.sh):
    python3 benchmarks/gpu/kv_transfer_micro.py --out /tmp/res/kv_transfer_micro.json --git-commit SHA
This machine (a smoke run of the plumbing on CPU tensors; no pinned memory, no registration):
    python benchmarks/gpu/kv_transfer_micro.py --device cpu --total-mib 64 --chunk-mib 8 --threads 1,2 \\
        --variants pageable,pinned_ring --out /tmp/kv_transfer_micro_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
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

VARIANTS = ("pageable", "pinned_ring", "register_chunk", "register_once", "register_once_direct")


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


def check(torch, pages, dst: list, values: list[int]) -> None:
    """Every loaded block holds its chunk's byte value in every layer (first and last byte of the page)."""
    for ids, v in zip(dst, values, strict=True):
        for layer in (pages.layers[0], pages.layers[-1]):
            got = layer.index_select(0, ids)
            if int(got[:, 0].min()) != v or int(got[:, -1].max()) != v:
                raise AssertionError(f"chunk with value {v}: wrong bytes in the pages")
        for layer in pages.layers:
            layer.index_fill_(0, ids, 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--layers", type=int, default=32, help="Llama-3.1-8B: 32")
    p.add_argument("--page-bytes", type=int, default=65536, help="one block of one layer: 16 x 8 x 128 x 2 x bf16")
    p.add_argument("--num-blocks", type=int, default=4096, help="blocks per layer of the paged device tensor")
    p.add_argument("--total-mib", type=int, default=1024, help="bytes loaded per cell (1 GiB = an 8K-token prefix)")
    p.add_argument("--chunk-mib", default="8,32,128")
    p.add_argument("--threads", default="1,2,4,8")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dst", choices=["random", "runs"], default="random",
                   help="destination blocks: scattered one by one, or one run of consecutive blocks per chunk")
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
    cuda = args.device.startswith("cuda")
    if not cuda:
        variants = [v for v in variants if v in ("pageable", "pinned_ring", "register_once_direct")]
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
    block_bytes = args.layers * args.page_bytes
    result: dict = {"command": shlex.join([sys.executable, *sys.argv]), "git_commit": args.git_commit,
                    "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                                "torch": torch.__version__, "ray": ray.__version__,
                                "gpu": torch.cuda.get_device_name() if cuda else "none"},
                    "dst": args.dst,
                    "layout": {"layers": args.layers, "page_bytes": args.page_bytes, "block_bytes": block_bytes,
                               "total_bytes_per_cell": args.total_mib * 1024**2},
                    "cells": []}
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
            for threads in (int(x) for x in args.threads.split(",")):
                run_cell(torch, ray, variant, refs, dst, pages, threads, per_chunk * block_bytes, args.device,
                         registrar if variant == "register_chunk" else None, dst_lists)  # warm-up
                check(torch, pages, dst, values)
                walls = []
                for _ in range(args.repeat):
                    walls.append(run_cell(torch, ray, variant, refs, dst, pages, threads, per_chunk * block_bytes,
                                          args.device, registrar if variant == "register_chunk" else None,
                                          dst_lists))
                    check(torch, pages, dst, values)
                gbps = [nbytes / w / 1e9 for w in walls]
                cell = {"variant": variant, "chunk_mib": round(per_chunk * block_bytes / 1024**2, 2),
                        "threads": threads, "chunks": n_chunks, "bytes": nbytes,
                        "gbps": [round(g, 2) for g in gbps], "gbps_median": round(statistics.median(gbps), 2)}
                result["cells"].append(cell)
                print(json.dumps(cell), flush=True)
                Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
            if once:
                registrar.release_ranges()
        del refs
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    best = max(result["cells"], key=lambda c: c["gbps_median"])
    print(f"best: {best['variant']} chunk {best['chunk_mib']} MiB x {best['threads']} threads: "
          f"{best['gbps_median']} GB/s", flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
