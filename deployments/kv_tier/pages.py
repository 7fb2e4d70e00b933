"""The paged KV cache as bytes: per-layer page views, staging slots, and the multi-run scatter.

Owns: ``KVPages``, ``Slot``/``make_slots`` (the staging pool of stores and GPU loads) and
``scatter_runs``/``scatter_many``.

Object layout. A chunk is one ``ray.put`` numpy ``uint8`` array ``(layers, n_blocks, page_bytes)``
where ``page_bytes`` is one block of one layer exactly as vLLM's paged cache holds it (dim 0 of
every attention backend's cache is the block; the page is contiguous for FlashAttention,
FlashInfer, Triton and CPU). Copies are therefore layout-agnostic byte copies; the key fingerprint
carries the page size so incompatible layouts never meet.

Staging slots are a fixed pool allocated once (one chunk each: a host buffer, pinned on GPU
machines, plus a device buffer, a stream and an event on GPUs), so the tier never grows memory.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass

import torch

from deployments.kv_tier.plan import copy_runs


class KVPages:
    """Byte views of a paged KV cache: one ``(num_blocks, page_bytes)`` uint8 view per layer."""

    def __init__(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.names = sorted(kv_caches)
        self.layers: list[torch.Tensor] = []
        for name in self.names:
            t = kv_caches[name]
            page = 1
            for s in t.shape[1:]:
                page *= s
            if t.stride(0) != page:
                raise ValueError(f"kv tier: layer {name} has no contiguous block pages "
                                 f"(shape {tuple(t.shape)}, strides {t.stride()})")
            flat = t.as_strided((t.shape[0], page), (page, 1))
            self.layers.append(flat.view(torch.uint8))
        self.num_layers = len(self.layers)
        self.page_bytes = self.layers[0].shape[1]
        self.device = self.layers[0].device
        self.cuda = self.device.type == "cuda"

    def block_bytes(self) -> int:
        """Bytes of one block over all layers."""
        return self.num_layers * self.page_bytes


@dataclass(slots=True)
class Slot:
    host: torch.Tensor  # uint8, pinned on GPU machines
    dev: torch.Tensor | None
    stream: object | None
    event: object | None


def make_slots(pages: KVPages, count: int, nbytes: int) -> queue.Queue[Slot]:
    q: queue.Queue[Slot] = queue.Queue()
    for _ in range(count):
        if pages.cuda:
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            dev = torch.empty(nbytes, dtype=torch.uint8, device=pages.device)
            stream = torch.cuda.Stream(device=pages.device, priority=0)
            q.put(Slot(host, dev, stream, torch.cuda.Event()))
        else:
            q.put(Slot(torch.empty(nbytes, dtype=torch.uint8), None, None, None))
    return q


MAX_FOREACH_RUNS = 4


def scatter_runs(layers: list[torch.Tensor], dev: torch.Tensor, src: list[int], dst: list[int], *,
                 non_blocking: bool = False) -> bool:
    """Copy ``dev[l, src[i]] -> layers[l][dst[i]]`` for every layer with ONE ``_foreach_copy_`` call
    when the blocks form at most ``MAX_FOREACH_RUNS`` runs of consecutive ids (the usual case for
    a fresh allocation); returns False (nothing copied) otherwise. ``dev`` may be a host tensor
    (page-locked plasma): the copies are then H2D straight into the pages (``non_blocking``).
    ``scatter_many`` does the same for several chunks in one call.
    """
    return scatter_many(layers, [(dev, src, dst)], non_blocking=non_blocking)[0]


def scatter_many(layers: list[torch.Tensor], chunks: list[tuple[torch.Tensor, list[int], list[int]]], *,
                 non_blocking: bool = False) -> list[bool]:
    """``scatter_runs`` for every ``(dev, src, dst)`` chunk, with ONE ``_foreach_copy_`` call for all
    the chunks whose blocks form at most ``MAX_FOREACH_RUNS`` runs; returns which chunks were copied
    (the others are left to the caller).

    Why one call: each torch call releases the GIL and takes it back. A loader thread competes for
    it with the engine's thread, which runs Python for most of every step, so each return can wait
    up to the interpreter's switch interval; per-layer or per-chunk calls multiply those waits by
    the layers or the chunks of a load.
    """
    foreach = getattr(torch, "_foreach_copy_", None)
    done = [False] * len(chunks)
    if foreach is None:
        return done
    dsts, srcs = [], []
    for i, (dev, src, dst) in enumerate(chunks):
        runs = copy_runs(src, dst)
        if len(runs) > MAX_FOREACH_RUNS:
            continue
        done[i] = True
        for l, layer in enumerate(layers):
            for s0, d0, k in runs:
                dsts.append(layer[d0:d0 + k])
                srcs.append(dev[l, s0:s0 + k])
    if dsts:
        foreach(dsts, srcs, non_blocking=non_blocking)
    return done
