"""What both sides of one engine's KV tier connector derive from the engine's config.

Owns: ``TierContext`` (the parsed ``KVTierConfig``, model id and tags, owner, block size, key
fingerprint, chunk size and the directory handle) and ``fingerprint_of``. ``TierContext.build``
joins the Ray cluster and finds the directory; a context that cannot (or a model with more than
one KV-cache group) comes back with ``enabled`` False, and the side that holds it does nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deployments.kv_tier import directory_actor
from deployments.kv_tier.engine_args import tier_config_from_extra
from deployments.kv_tier.keys import Fingerprint
from deployments.kv_tier.shared import ensure_ray
from serve_app.config.kv_tier import KVTierConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger(__name__)


def fingerprint_of(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, model_id: str) -> Fingerprint:
    """The key fingerprint of this engine (same on its scheduler and all its workers)."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    group = kv_cache_config.kv_cache_groups[0]
    spec = group.kv_cache_spec
    kv_dtype = str(spec.dtype) if cc.cache_dtype == "auto" else str(cc.cache_dtype)
    return Fingerprint(
        model=model_id, revision=mc.revision, kv_dtype=kv_dtype, block_size=cc.block_size,
        hash_algo=str(cc.prefix_caching_hash_algo), hash_seed=os.environ.get("PYTHONHASHSEED"),
        tp_size=pc.tensor_parallel_size * pc.pipeline_parallel_size,
        num_layers=len(group.layer_names), page_bytes=int(spec.page_size_bytes),
        layout=f"{type(spec).__name__}:{getattr(spec, 'num_kv_heads', '')}x{getattr(spec, 'head_size', '')}",
    )


@dataclass
class TierContext:
    """One engine's tier settings, as its scheduler side and every worker derive them alike."""

    cfg: KVTierConfig
    model: str
    tags: dict[str, str]
    owner: str
    bs: int
    enabled: bool = False
    fp: Fingerprint | None = None
    fp_digest: bytes = b""
    tp: int = 1
    block_bytes: int = 0
    chunk_blocks: int = 0
    dir: Any = None

    @classmethod
    def build(cls, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, kv_transfer_config: Any) -> TierContext:
        cfg, model_id = tier_config_from_extra(kv_transfer_config.kv_connector_extra_config)
        model = model_id or vllm_config.model_config.served_model_name or "model"
        if isinstance(model, list):
            model = model[0]
        ctx = cls(cfg=cfg, model=model, tags={"model": str(model)}, owner=str(kv_transfer_config.engine_id),
                  bs=vllm_config.cache_config.block_size)
        if len(kv_cache_config.kv_cache_groups) != 1:
            logger.warning("kv tier: disabled (%d KV cache groups; only uniform models are supported)",
                           len(kv_cache_config.kv_cache_groups))
            return ctx
        ctx.fp = fingerprint_of(vllm_config, kv_cache_config, str(model))
        ctx.fp_digest = ctx.fp.digest()
        ctx.tp = ctx.fp.tp_size
        if ctx.fp.hash_seed is None:
            logger.warning("kv tier: PYTHONHASHSEED is unset, so block hashes differ per process and "
                           "replicas cannot share blocks; set it identically on every replica")
        ctx.block_bytes = ctx.fp.num_layers * ctx.fp.page_bytes
        ctx.chunk_blocks = max(1, int(cfg.chunk_mib * 1024**2) // max(1, ctx.block_bytes))
        try:
            ensure_ray(cfg.ray_address, cfg.namespace)
            ctx.dir = directory_actor.get_directory(
                cfg.directory_name, cfg.namespace, cfg.budget_bytes, cfg.max_object_store_fraction,
                str(model),
            )
        except Exception:
            logger.exception("kv tier: disabled: cannot reach the Ray cluster / directory")
            return ctx
        ctx.enabled = True
        return ctx
