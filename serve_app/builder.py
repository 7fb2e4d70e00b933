"""The Serve application builder: config in, application graph out.

Owns: ``build_app``, the ``import_path`` target of every config file
(``serve_app.builder:build_app``). It validates the whole config before anything starts (a
``ConfigError`` names the field), refuses to start beside an orphaned HAProxy of an earlier session
(``serve_app.haproxy_guard``), then binds one vLLM replica deployment per model and the ingress
that routes to them. No request-path logic lives here.
"""

from __future__ import annotations

import logging
from typing import Any

from serve_app.config import AppConfig, load_app_config
from serve_app.haproxy_guard import check_no_stale_haproxy

logger = logging.getLogger(__name__)


def build_app(args: dict[str, Any]):
    """Build the application from ``applications[].args`` of a Serve config file."""
    from deployments.ingress import build_ingress
    from deployments.vllm_replica import build_replica

    cfg = args if isinstance(args, AppConfig) else load_app_config(dict(args))
    check_no_stale_haproxy()
    for m in cfg.models:
        if not (m.resolved_path() / "config.json").exists():
            raise FileNotFoundError(
                f"model {m.id!r}: no config.json in {m.resolved_path()}; run `kvserve prepare-model` "
                "or fix models[].path"
            )
    replicas = {m.id: build_replica(m, cfg) for m in cfg.models}
    logger.info("building app: models=%s routing=%s kv_tier=%s", [m.id for m in cfg.models],
                cfg.routing.strategy, cfg.kv_tier.enabled)
    return build_ingress(cfg, replicas)
