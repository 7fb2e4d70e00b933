"""The vLLM adapter of the KV tier: ``RayObjectStoreConnector``, a ``KVConnectorBase_V1``.

Owns: the class vLLM loads (targets vLLM 0.26-0.27; no version sniffing: only hooks that exist
in both are used). As vLLM's own connectors do, it dispatches by role: the scheduler process's
instance to ``scheduler.TierScheduler``, each worker's to ``worker.TierWorker``; what the first
tells the second each step is ``messages.TierMeta``, and what both derive from the config is
``context.TierContext``. Tensor and object-store I/O is in ``pages.py``, ``store.py`` and
``load.py`` (with ``host_memory.py`` and ``shared.py``), the directory actor in ``directory_actor.py``.

Why a KVConnectorBase_V1 and not an OffloadingConnector spec. The native OffloadingConnector
+ TieringOffloadingSpec would make Ray a *secondary* tier behind a pinned /dev/shm L1 managed in
the scheduler process: every hit goes plasma -> L1 -> GPU (one extra host copy), L1 costs a
second copy of the cache's worth of host memory per replica, and its lookup/store API
(OffloadKey, JobResult, HIT_PENDING) changed between 0.26 and 0.27. Ray's object store already
*is* a shared-memory host tier, so a direct connector (modelled on SimpleCPUOffloadConnector:
async loads, stores off the critical path, delayed frees) does one host copy each way, keeps all
version-sensitive code in the connector, scheduler, worker and messages modules, and can still be chained
after vLLM's CPU offload with ``MultiConnector`` if an L1 is wanted later.

Flow (one engine; ``S`` = scheduler side in EngineCore, ``W`` = each worker)::

    S on_new_request: block keys -> directory.lookup (async, sent as the request arrives)
    S get_num_new_matched_tokens: that lookup's answer (None = not in yet, ask next step)
      -> longest present run beyond the local hit -> (run*B, load_mode == "async")
    S update_state_after_alloc: remember (block ids, hashes) of the run -> load op
    S build_connector_meta: load ops + store ops for prompt blocks that became full this step
      (minus blocks the tier already held; a busy step admits only a small budget)
    W start_load_kv: Loader threads fetch chunks, copy into the blocks; async: the request waits
      in WAITING_FOR_REMOTE_KVS (other requests keep stepping) until get_finished(recving) names
      it; sync: start_load_kv waits for the copies before the forward (the whole step waits)
    W wait_for_save: Storer copies the new blocks out (side stream), thread ray.put + register
    S request_finished: hold the blocks (True) until W reports the copies done (finished_sending)
    W get_block_ids_with_load_errors: blocks of lost/evicted chunks -> vLLM recomputes them

Configuration arrives in ``kv_connector_extra_config`` (``KVTierConfig.model_dump()`` + the model id,
built by ``kv_tier_engine_kwargs``) and is validated back into a ``KVTierConfig`` once per
connector (``TierContext.build`` -> ``tier_config_from_extra``); its defaults are the only ones.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from deployments.kv_tier.context import TierContext
from deployments.kv_tier.scheduler import TierScheduler
from deployments.kv_tier.worker import TierWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


class RayObjectStoreConnector(KVConnectorBase_V1):
    """Shared prefix-KV tier in Ray's object store (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config, role, kv_cache_config)
        ctx = TierContext.build(vllm_config, kv_cache_config, self._kv_transfer_config)
        if ctx.enabled:
            logger.info("kv tier: role=%s model=%s fingerprint=%s chunk=%d blocks (%d B/block)",
                        role.name, ctx.model, ctx.fp_digest.hex(), ctx.chunk_blocks, ctx.block_bytes)
        self._scheduler = TierScheduler(ctx) if role == KVConnectorRole.SCHEDULER else None
        self._worker = TierWorker(ctx) if role == KVConnectorRole.WORKER else None

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped store is a future miss

    # ==== worker side =========================================================================
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert self._worker is not None
        self._worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        if self.has_connector_metadata():
            self._worker.start_load_kv(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        assert self._worker is not None
        if self.has_connector_metadata():
            self._worker.wait_for_save(self._get_connector_metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        return self._worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.get_block_ids_with_load_errors()

    # ==== scheduler side ======================================================================
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def on_new_request(self, request: Request) -> None:
        assert self._scheduler is not None
        self._scheduler.on_new_request(request)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)

    def take_events(self):
        assert self._scheduler is not None
        return self._scheduler.take_events()
