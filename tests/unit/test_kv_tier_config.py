"""KV tier config -> vLLM engine kwargs and replica environment (pure)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.kv_tier import kv_tier_engine_kwargs, kv_tier_env
from deployments.kv_tier.engine_args import tier_config_from_extra
from serve_app.config import load_app_config
from serve_app.config.kv_tier import KVTierConfig

pytestmark = pytest.mark.unit


def test_disabled_tier_adds_nothing():
    tier = KVTierConfig(enabled=False)
    assert kv_tier_engine_kwargs(tier, "m") == {}
    assert kv_tier_env(tier) == {}


def test_enabled_tier_names_the_connector_and_recompute_policy():
    tier = KVTierConfig(enabled=True, budget_gib=2, namespace="ns", directory_name="dir", chunk_mib=16)
    kw = kv_tier_engine_kwargs(tier, "llama", ray_address="10.0.0.1:6379")
    ktc = kw["kv_transfer_config"]
    assert ktc["kv_connector"] == "RayObjectStoreConnector"
    assert ktc["kv_connector_module_path"] == "deployments.kv_tier.connector"
    assert ktc["kv_role"] == "kv_both" and ktc["kv_load_failure_policy"] == "recompute"
    x = ktc["kv_connector_extra_config"]
    assert x["model_id"] == "llama" and x["ray_address"] == "10.0.0.1:6379"
    assert x["namespace"] == "ns" and x["directory_name"] == "dir"
    assert x["budget_gib"] == 2 and x["chunk_mib"] == 16
    assert kv_tier_env(tier) == {"PYTHONHASHSEED": "0"}


def test_extra_config_is_the_model_dump_and_parses_back():
    tier = KVTierConfig(enabled=True, budget_gib=2, chunk_mib=16, host_dma="per_chunk", lookup_timeout_s=3)
    x = kv_tier_engine_kwargs(tier, "llama",
                              ray_address="10.0.0.1:6379")["kv_transfer_config"]["kv_connector_extra_config"]
    assert set(x) == set(KVTierConfig.model_fields) | {"model_id"}
    cfg, model_id = tier_config_from_extra(x)
    assert model_id == "llama" and cfg == tier.model_copy(update={"ray_address": "10.0.0.1:6379"})
    assert cfg.budget_bytes == 2 * 1024**3


def test_connector_defaults_are_the_models():
    cfg, model_id = tier_config_from_extra({})
    assert model_id is None and cfg == KVTierConfig()
    assert cfg.host_dma == "mapping"  # the model's default reaches the engine, not one restated there
    with pytest.raises(ValidationError):
        tier_config_from_extra({"chunk_mb": 32})


def test_load_mode_is_sync_or_async_and_reaches_the_engine():
    assert KVTierConfig().load_mode == "async"  # the mode the GPU runs measured
    x = kv_tier_engine_kwargs(KVTierConfig(enabled=True, load_mode="sync"), "m")["kv_transfer_config"]
    assert tier_config_from_extra(x["kv_connector_extra_config"])[0].load_mode == "sync"
    with pytest.raises(ValidationError) as err:
        KVTierConfig(load_mode="background")
    (e,) = err.value.errors()
    assert e["loc"] == ("load_mode",) and "'sync' or 'async'" in e["msg"]


def test_every_field_is_described_and_unknown_fields_are_rejected():
    for name, field in KVTierConfig.model_fields.items():
        assert field.description, name
    with pytest.raises(ValidationError):
        KVTierConfig(budget=1)


def test_app_config_accepts_kv_tier_section():
    cfg = load_app_config({"models": [{"id": "m", "path": "/x"}], "kv_tier": {"enabled": True, "budget_gib": 1}})
    assert cfg.kv_tier.budget_bytes == 1024**3


def test_model_config_is_accepted_for_the_model_id():
    cfg = load_app_config({"models": [{"id": "m1", "path": "/x"}], "kv_tier": {"enabled": True}})
    x = kv_tier_engine_kwargs(cfg.kv_tier, cfg.models[0])["kv_transfer_config"]["kv_connector_extra_config"]
    assert x["model_id"] == "m1"
