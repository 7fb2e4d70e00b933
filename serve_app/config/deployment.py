"""Ray Serve deployment options, passed through to ``serve.deployment`` unchanged.

Owns: ``DeploymentOptions``, the subset of Ray Serve's per-deployment schema a user may set for the
ingress and for each model's replica deployment. Names and meanings are Serve's own (so the same YAML
reads the same in Serve's docs); nothing is re-invented. ``max_ongoing_requests`` is always set
explicitly because Serve's default of 5 throttles LLM serving. ``autoscaling_config`` is validated by
Serve's own ``AutoscalingConfig`` model, and must name ``target_ongoing_requests`` explicitly.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_ROUTER_CONFIG_FIELDS = {"request_routing_stats_period_s", "request_routing_stats_timeout_s"}


class DeploymentOptions(BaseModel):
    """Options of one Ray Serve deployment (a subset of ``ray.serve.schema.DeploymentSchema``)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(
        default=None, ge=0, description="Fixed replica count; leave unset when autoscaling_config is set."
    )
    autoscaling_config: dict[str, Any] | None = Field(
        default=None,
        description="Ray Serve autoscaling_config (min/max/initial_replicas, target_ongoing_requests, "
        "upscale_delay_s, downscale_delay_s, ...). target_ongoing_requests must be given explicitly.",
    )
    max_ongoing_requests: int = Field(
        ge=1, description="Requests one replica runs at once. Required: Serve's default (5) throttles LLMs."
    )
    max_queued_requests: int = Field(
        default=-1,
        ge=-1,
        description="Requests each caller (proxy or ingress replica) may queue for this deployment beyond its "
        "replicas' max_ongoing_requests before getting a fast 503; -1 = unbounded (refused by `kvserve kuberay "
        "render`). Each prompt of a batched completion request is one request here. For a model's replicas the "
        "ingress keeps this bound itself (deployments.admission) and gives Serve one it cannot reach first.",
    )
    backpressure_config: dict[str, Any] | None = Field(
        default=None,
        description="Ray Serve backpressure_config of the rejections beyond max_queued_requests: status_code (503 or "
        "429) and retry_after_s (the Retry-After header). The ingress copies retry_after_s of a model's replicas "
        "into its own 503.",
    )
    ray_actor_options: dict[str, Any] = Field(
        default_factory=dict, description="Ray actor options of each replica (num_cpus, memory, runtime_env...)."
    )
    health_check_period_s: float = Field(default=10.0, gt=0, description="Seconds between health checks.")
    health_check_timeout_s: float = Field(default=30.0, gt=0, description="Health check timeout in seconds.")
    graceful_shutdown_wait_loop_s: float = Field(
        default=2.0, gt=0, description="Seconds between checks for in-flight requests during shutdown."
    )
    graceful_shutdown_timeout_s: float = Field(
        default=60.0, ge=0, description="Seconds a stopping replica may take to finish in-flight generations."
    )
    max_replicas_per_node: int | None = Field(default=None, ge=1, description="Spread limit per node.")
    request_routing_stats_period_s: float = Field(
        default=1.0, gt=0, description="How often Serve polls each replica's routing stats (seconds)."
    )
    request_routing_stats_timeout_s: float = Field(
        default=5.0, gt=0, description="Timeout of one routing-stats poll (seconds)."
    )

    @field_validator("autoscaling_config")
    @classmethod
    def _check_autoscaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        if "target_ongoing_requests" not in value:
            raise ValueError(
                "autoscaling_config.target_ongoing_requests must be set explicitly "
                "(otherwise a replica never looks busy enough to scale)"
            )
        from ray.serve.config import AutoscalingConfig  # Serve's own validation

        AutoscalingConfig(**value)
        return value

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_bound(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (unbounded) or a positive number of requests (Serve rejects 0)")
        return value

    @field_validator("backpressure_config")
    @classmethod
    def _check_backpressure(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from ray.serve.config import BackpressureConfig  # Serve's own validation

            BackpressureConfig(**value)
        return value

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> DeploymentOptions:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self

    def replica_bounds(self) -> tuple[int, int]:
        """(min, max) replicas Serve may run: ``num_replicas`` both ways, else the autoscaling bounds with Serve's
        own defaults (its ``AutoscalingConfig``)."""
        if self.autoscaling_config is not None:
            from ray.serve.config import AutoscalingConfig

            auto = AutoscalingConfig(**self.autoscaling_config)
            return auto.min_replicas, auto.max_replicas
        n = 1 if self.num_replicas is None else self.num_replicas
        return n, n

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``serve.deployment(...).options(...)``.

        The routing-stats periods belong in Serve's ``request_router_config``, which only the replica
        builder sets, so they are left out here.
        """
        opts = self.model_dump(exclude_none=True, exclude=_ROUTER_CONFIG_FIELDS)
        if self.num_replicas is None and self.autoscaling_config is None:
            opts["num_replicas"] = 1
        return opts
