"""Configuration of the shared KV tier in Ray's object store.

Owns: ``KVTierConfig``. ``deployments.kv_tier.kv_tier_engine_kwargs`` turns it into vLLM engine
arguments (a ``kv_transfer_config`` naming the tier's connector).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GiB = 1024**3


class KVTierConfig(BaseModel):
    """The cluster-wide prefix KV tier (a vLLM KV connector backed by Ray's object store)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=False,
        description="Store full prompt blocks' KV in the object store and load them on any replica. Off unless "
        "a config turns it on; the GPU configs do (configs/gpu.yaml: on the H200 it cost ~1% throughput with no "
        "reuse, benchmarks/results/kv_tier_h200.json).",
    )
    budget_gib: float = Field(
        default=8.0, gt=0,
        description="Byte budget of the tier (GiB, cluster-wide). LRU chunks are evicted beyond it. "
        "Also capped at `max_object_store_fraction` of the smallest node's object store.",
    )
    max_object_store_fraction: float = Field(
        default=0.6, gt=0, le=0.9,
        description="Cap of the budget as a fraction of one node's object store, leaving room for "
        "Serve's own objects and in-flight chunks (no spilling, no ObjectStoreFullError).",
    )
    chunk_mib: float = Field(
        default=32.0, gt=0,
        description="Target size of one stored object (MiB): consecutive blocks of one request are "
        "packed up to this size (ray.put costs ~0.4 ms per object; 32 MiB chunks reach GB/s).",
    )
    min_store_blocks: int = Field(
        default=2, ge=1, description="Prompts with fewer full KV blocks than this are not stored."
    )
    min_load_blocks: int = Field(
        default=1, ge=1, description="A tier hit shorter than this many blocks is ignored (recomputed)."
    )
    store_slots: int = Field(
        default=8, ge=1,
        description="Staging buffers (each one chunk, pinned on GPU) for stores in flight; when all "
        "are busy further stores wait in the backlog (never the engine).",
    )
    store_threads: int = Field(
        default=2, ge=1, description="Threads doing ray.put of staged chunks (each ~5-17 GB/s on an H100 host)."
    )
    store_backlog_mib: float = Field(
        default=2048, gt=0,
        description="Most KV (MiB) queued for storing per worker; the queued blocks stay allocated until "
        "copied, so this bounds the KV capacity stores can hold back. Beyond it stores are dropped.",
    )
    store_busy_requests: int = Field(
        default=2, ge=0,
        description="A step that schedules more requests than this is busy: it stores at most "
        "`store_busy_mib_per_step` of prompt KV (lowest blocks first). Storing every prompt block cost 14% "
        "throughput on the H100 without reuse; hot prefixes still get stored once, cluster-wide, by a "
        "lightly loaded step. 0 disables the gate (store everything).",
    )
    store_busy_mib_per_step: float = Field(
        default=32.0, ge=0, description="Prompt KV (MiB) a busy step may store (see `store_busy_requests`)."
    )
    host_dma: Literal["staged", "per_chunk", "mapping"] = Field(
        default="mapping",
        description="GPU only: how a loaded chunk reaches the GPU. `mapping`: the object store's memory is "
        "page-locked once per engine process (in the background at start) and every chunk is DMA'd straight "
        "from it; `per_chunk`: each chunk is page-locked for its copy and unlocked after; `staged`: memcpy "
        "into a pinned slot, then H2D. See deployments/kv_tier/host_memory.py for the measured costs.",
    )
    load_mode: Literal["sync", "async"] = Field(
        default="async",
        description="How a tier hit is loaded. `async` (the default, the mode measured on the GPU so far): the "
        "request waits in vLLM's WAITING_FOR_REMOTE_KVS while the loader's threads copy its blocks, and the "
        "engine keeps stepping the other requests; it is reported ready once every copy has completed. "
        "`sync`: the request is scheduled at once and the worker waits for its load inside the step before "
        "the forward pass, so every other request's step waits too (a baseline for comparison).",
    )
    load_threads: int = Field(
        default=2, ge=1,
        description="Parallel chunk loads per worker for chunks that cannot go straight into the pages. On the H200, "
        "2 threads moved 32 MiB chunks fastest (benchmarks/results/kv_transfer_micro_h200.json: 50 GB/s from the "
        "page-locked store, 25 GB/s through pinned slots; 8 threads: 24 and 14 GB/s).",
    )
    parallel_loads: int = Field(
        default=2, ge=1,
        description="Loads (one request's tier hit each) in flight per worker; each runs on its own thread "
        "(locate, fetch, the direct copies into the pages), later ones queue for a free one.",
    )
    lookup_timeout_s: float = Field(
        default=0.5, gt=0,
        description="A directory lookup slower than this is treated as a miss (the request is not held).",
    )
    load_timeout_s: float = Field(
        default=30.0, gt=0, description="A load slower than this fails and its blocks are recomputed."
    )
    directory_name: str = Field(default="kvserve_kv_tier_directory", description="Name of the directory actor.")
    namespace: str = Field(
        default="kvserve",
        description="Ray namespace of the directory actor; the engine core joins the cluster with it.",
    )
    ray_address: str | None = Field(
        default=None,
        description="Ray address the engine core connects to; default: the replica's own cluster "
        "(its GCS address), else RAY_ADDRESS / `auto`.",
    )
    emit_kv_events: bool = Field(
        default=True, description="Publish BlockStored/BlockRemoved events with medium=\"OBJ\" for the router."
    )

    @property
    def budget_bytes(self) -> int:
        """The configured budget in bytes."""
        return int(self.budget_gib * GiB)
