"""How a vLLM replica turns ``KVTierConfig`` into engine arguments and process environment.

Owns: ``kv_tier_engine_kwargs`` and ``kv_tier_env``. Imports neither vllm nor torch (the replica
builder calls it before the engine exists); Ray only to find the cluster's address.
"""

from __future__ import annotations

from typing import Any

from serve_app.config.kv_tier import KVTierConfig

CONNECTOR_CLASS = "RayObjectStoreConnector"
CONNECTOR_MODULE = "deployments.kv_tier.connector"


def _cluster_address() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - no usable Ray here: let the engine use RAY_ADDRESS/auto
        return None
    return None


def kv_tier_engine_kwargs(tier: KVTierConfig, model_id: Any, ray_address: str | None = None) -> dict[str, Any]:
    """vLLM engine kwargs (merge into the replica's ``AsyncEngineArgs``) that enable the tier.

    Args:
        tier: the app's KV tier config.
        model_id: the served model id (part of every block key: replicas of one model share), or
            a ``ModelConfig`` (its ``id`` is used).
        ray_address: cluster address for the engine-core process (its own Ray driver); default:
            ``tier.ray_address``, else the calling process's cluster (GCS address), else ``auto``.

    Returns:
        ``{}`` when the tier is disabled, else ``{"kv_transfer_config": {...}}``. Prefix caching
        stays on: the tier is consulted only beyond the local prefix-cache hit.
    """
    if not tier.enabled:
        return {}
    extra = {
        "model_id": str(getattr(model_id, "id", model_id)),
        "ray_address": ray_address or tier.ray_address or _cluster_address(),
        "namespace": tier.namespace,
        "directory_name": tier.directory_name,
        "budget_bytes": tier.budget_bytes,
        "max_object_store_fraction": tier.max_object_store_fraction,
        "chunk_mib": tier.chunk_mib,
        "min_store_blocks": tier.min_store_blocks,
        "min_load_blocks": tier.min_load_blocks,
        "store_slots": tier.store_slots,
        "store_threads": tier.store_threads,
        "store_backlog_mib": tier.store_backlog_mib,
        "store_busy_requests": tier.store_busy_requests,
        "store_busy_mib_per_step": tier.store_busy_mib_per_step,
        "register_host_memory": tier.register_host_memory,
        "load_threads": tier.load_threads,
        "lookup_timeout_s": tier.lookup_timeout_s,
        "load_timeout_s": tier.load_timeout_s,
        "emit_kv_events": tier.emit_kv_events,
    }
    return {
        "kv_transfer_config": {
            "kv_connector": CONNECTOR_CLASS,
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra,
        }
    }


def kv_tier_env(tier: KVTierConfig, hash_seed: str = "0") -> dict[str, str]:
    """Environment variables the replica (and so its engine-core process) needs for the tier.

    ``PYTHONHASHSEED`` makes vLLM's NONE_HASH (the root of every block-hash chain) equal on all
    replicas; without it no block is ever shared. Pass the seed the routing config gives every
    replica (``RoutingConfig.hash_seed``); the replica builder already sets exactly that, so this is
    for other launchers (tests, benchmarks). The Ray address and namespace travel in the connector
    config, not in the environment; the engine core must be able to import ``deployments`` (the
    replica's working_dir / PYTHONPATH, inherited by vLLM's spawned processes).
    """
    return {"PYTHONHASHSEED": str(hash_seed)} if tier.enabled else {}
