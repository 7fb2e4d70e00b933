"""The application's one configuration tree, and how it is loaded.

Owns: ``AppConfig`` (root), ``load_app_config`` (from a Serve config YAML or a plain dict) and
``ConfigError``. A config file is a Ray Serve config file: ``applications[i].args`` holds an
``AppConfig``; the same file drives ``serve run``, the tests and the RayService ``serveConfigV2``.
Validation happens before anything starts, and an error names the offending field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serve_app.config.auth import AuthConfig, TenantConfig
from serve_app.config.deployment import DeploymentOptions
from serve_app.config.kv_tier import KVTierConfig
from serve_app.config.models import ModelConfig
from serve_app.config.routing import RoutingConfig

__all__ = [
    "AppConfig",
    "AuthConfig",
    "ConfigError",
    "DeploymentOptions",
    "IngressConfig",
    "KVTierConfig",
    "ModelConfig",
    "RoutingConfig",
    "TenantConfig",
    "TracingConfig",
    "load_app_config",
    "load_serve_config",
]


class ConfigError(ValueError):
    """A configuration is invalid; the message names the field."""


def _default_ingress_options() -> DeploymentOptions:
    return DeploymentOptions(num_replicas=1, max_ongoing_requests=2048, ray_actor_options={"num_cpus": 1})


class IngressConfig(BaseModel):
    """The OpenAI-compatible ingress deployment."""

    model_config = ConfigDict(extra="forbid")

    deployment: DeploymentOptions = Field(
        default_factory=_default_ingress_options, description="Ray Serve options of the ingress deployment."
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0,
        description="Upper bound on one request, in seconds: past it the generation is aborted and the client gets "
        "a 504 (timeout_error). Shutdown grace periods must cover it (checked by `kvserve kuberay render`).")
    expose_cached_tokens: bool = Field(
        default=False,
        description="Report usage.prompt_tokens_details.cached_tokens. Off by default: with several tenants sharing "
        "a cache group, a client could learn which prefixes others sent.")
    expose_replica_header: bool = Field(
        default=False, description="Send the `x-kvserve-replica` response header (which replica served the request; a "
        "stream's names the replica of its first chunk).")
    server_timing_header: bool = Field(
        default=False,
        description="Send a `Server-Timing` response header: the request's stages up to its first chunk at the "
        "ingress (`tokenize`, `hash`, `dispatch`, `engine`, `return`, their sum `ingress`; `dur` in ms) and when the "
        "ingress accepted it (`accepted;desc=` epoch seconds), so a client can tell its own and the network's time "
        "from the server's (`kvserve bench --server-timing`). Off by default: it tells clients how loaded the "
        "replicas are.")
    max_body_bytes: int | None = Field(
        default=4 * 1024 * 1024, ge=1024,
        description="Largest request body accepted, in bytes; a larger one gets a 413 before it is parsed. JSON "
        "decoding and validation hold the ingress's event loop for about 0.15 s per MB of many small messages, so "
        "this bounds the stall one request can cause. A full 128K-token prompt is ~0.5 MB as text, ~0.8 MB as "
        "token ids. null: no limit.")
    stream_merge_lag_ms: float = Field(
        default=5.0, ge=0,
        description="While this ingress replica's event loop runs its timers more than this late (smoothed), the "
        "requests it dispatches ask their replica to merge consecutive engine steps into one chunk per the model's "
        "stream_merge_interval_ms (fewer chunks for the ingress to read, format and write; unchanged tokens/s), "
        "until the lag falls below half of it. A model whose stream_merge_lag_ms is 0 never merges. 0: never ask.")
    stream_merge_busy: float = Field(
        default=0.5, ge=0, le=1,
        description="The same request, while this ingress replica's event-loop thread is on a CPU more than this share "
        "of the time (about the last second; until it falls below 0.6 of it): a loop that busy makes every new "
        "request's hops wait behind the chunks of the others. 0: never ask on this account.")
    max_prompts_per_request: int = Field(
        default=256, ge=1,
        description="Most prompts one /v1/completions request may batch (each becomes its own replica call); "
        "more is a 400 (too_many_prompts).")
    max_choices_per_request: int = Field(
        default=512, ge=1,
        description="Most choices one request may ask for: n x prompts; more is a 400 (too_many_choices).")


class TracingConfig(BaseModel):
    """OpenTelemetry request spans (off unless an OTLP endpoint is named)."""

    model_config = ConfigDict(extra="forbid")

    otlp_traces_endpoint: str | None = Field(
        default=None,
        description="OTLP/gRPC endpoint (e.g. http://otel-collector:4317). When set, the ingress exports one span "
        "per request with a child span per stage, and every vLLM engine gets the same endpoint "
        "(vLLM's otlp_traces_endpoint) with the request's trace context, so its span joins the trace.")
    service_name: str = Field(default="kvserve", description="service.name of the ingress's spans.")


class AppConfig(BaseModel):
    """Root of the application configuration (``applications[].args`` in a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(min_length=1, description="Served models, each with its own replicas.")
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="Ingress deployment.")
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="Request routing.")
    kv_tier: KVTierConfig = Field(default_factory=KVTierConfig, description="Shared KV tier.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys, tenants and their limits.")
    tracing: TracingConfig = Field(default_factory=TracingConfig, description="OpenTelemetry request spans.")

    @model_validator(mode="after")
    def _unique_ids(self) -> AppConfig:
        ids = [m.id for m in self.models]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"models: duplicate model id(s) {dup}")
        return self

    def model(self, model_id: str) -> ModelConfig | None:
        """The model with this id, or None."""
        return next((m for m in self.models if m.id == model_id), None)


def _format(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{where}{loc}: {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_app_config(args: dict[str, Any], where: str = "") -> AppConfig:
    """Validate one application's ``args``; raise ConfigError naming the field."""
    try:
        return AppConfig.model_validate(args)
    except ValidationError as err:
        raise ConfigError(_format(err, where)) from None


def load_serve_config(path: str | Path) -> tuple[dict[str, Any], list[AppConfig]]:
    """Read a Serve config file; return the raw document and each application's validated AppConfig."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("applications"), list):
        raise ConfigError(f"{path}: expected a Ray Serve config with an `applications:` list")
    apps = []
    for i, app in enumerate(doc["applications"]):
        if not isinstance(app, dict) or not isinstance(app.get("args"), dict):
            raise ConfigError(f"{path}: applications.{i}.args must be a mapping holding the app config")
        apps.append(load_app_config(app["args"], where=f"applications.{i}.args."))
    return doc, apps
