"""How a vLLM replica turns ``KVTierConfig`` into engine arguments and process environment.

Owns: ``kv_tier_engine_kwargs``, ``kv_tier_env`` and ``tier_config_from_extra`` (the connector's
way back from ``kv_connector_extra_config`` to a ``KVTierConfig``). Imports neither vllm nor torch
(the replica builder calls it before the engine exists); Ray only to find the cluster's address.

The extra config is ``KVTierConfig.model_dump()`` (with ``ray_address`` resolved) plus
``model_id``, so the replica and the engine process share one type and its defaults live only in
the model.
"""

from __future__ import annotations

from typing import Any

from serve_app.config.kv_tier import KVTierConfig

CONNECTOR_CLASS = "RayObjectStoreConnector"
CONNECTOR_MODULE = "deployments.kv_tier.connector"
MODEL_ID_KEY = "model_id"  # the one key of the extra config that is not a KVTierConfig field


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
    extra = tier.model_dump(mode="json")
    extra["ray_address"] = ray_address or tier.ray_address or _cluster_address()
    extra[MODEL_ID_KEY] = str(getattr(model_id, "id", model_id))
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


def tier_config_from_extra(extra: dict[str, Any] | None) -> tuple[KVTierConfig, str | None]:
    """The ``KVTierConfig`` and model id that ``kv_tier_engine_kwargs`` put in the extra config.

    Validated once, in the engine process; a missing field takes the model's default (the
    connector restates none). ``enabled`` is not consulted there: an engine that loads the
    connector has the tier on.
    """
    x = dict(extra or {})
    model_id = x.pop(MODEL_ID_KEY, None)
    return KVTierConfig.model_validate(x), (str(model_id) if model_id else None)
