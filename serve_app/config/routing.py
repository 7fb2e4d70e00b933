"""Routing configuration: which policy the ingress uses and its knobs.

Owns: ``RoutingConfig``. The defaults here are the single documented place for routing defaults;
``knobs()`` turns them into the plain ``routers.policy.Knobs`` the pure policies take (routers/
holds no defaults of its own). The algorithm is described in ``routers/policy.py`` and
docs/routing.md.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from routers.policy import Knobs

Strategy = Literal["prefix-aware", "kv-aware", "round-robin", "least-loaded"]
HashAlgo = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]


class RoutingConfig(BaseModel):
    """How the ingress picks a replica for each request."""

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy = Field(
        default="kv-aware",
        description="Routing policy. kv-aware (default): precise index from the replicas' vLLM KV events (GPU/CPU/OBJ "
        "tiers), each replica publishing through a relay; a replica whose events are not live is read from the "
        "approximate index instead. prefix-aware: only the approximate index learned from this router's own "
        "decisions; round-robin; least-loaded. Cache-aware policies minimise predicted time to first token.",
    )
    session_header: str | None = Field(
        default=None, description="HTTP header whose value pins a session to a replica (e.g. x-session-id)."
    )
    hash_seed: str = Field(
        default="0",
        description="PYTHONHASHSEED given to every replica; vLLM derives its root block hash from it, and the "
        "router uses the same value so both compute the same block hashes.",
    )
    hash_seed_from_env: bool = Field(
        default=False,
        description="Take the seed from the PYTHONHASHSEED environment variable of the process that builds the app "
        "and of each ingress (on KubeRay: set on every pod from a Secret, cluster.security.hash_seed_secret) "
        "instead of hash_seed, so the seed is not in the config. Missing or 'random' is an error.",
    )
    hash_algo: HashAlgo = Field(
        default="sha256",
        description="vLLM prefix_caching_hash_algo; the builder must pass the same value in engine_kwargs "
        "(sha256 is vLLM's default). xxhash variants need the xxhash package.",
    )
    prefill_s_per_token: float = Field(
        default=1e-4,
        gt=0,
        description="Per-token prefill cost (seconds) assumed while no replica has measured its prefill speed "
        "(ReplicaStats.prefill_tokens_per_s); once some have, every replica is costed at their mean measured "
        "speed. 1e-4 = 10k tokens/s.",
    )
    prefill_speed: Literal["measured", "fixed"] = Field(
        default="measured",
        description="Prefill speed the router prices prompts and ages queues with: 'measured' = the mean of the "
        "replicas' reported speeds (ReplicaStats.prefill_tokens_per_s, prefill_s_per_token until one reports); "
        "'fixed' = 1 / prefill_s_per_token always (set it to the hardware's speed; an A/B against the meter).",
    )
    running_request_tokens: float = Field(
        default=16.0,
        ge=0,
        description="Prefill-equivalent tokens charged per running request on a replica (decode batches "
        "share the engine step with prefill chunks).",
    )
    host_load_ratio: float = Field(
        default=0.08,
        ge=0,
        le=1,
        description="Cost of loading one token's KV from a replica's own CPU/host tier, as a fraction of "
        "recomputing it (measured: 8K prompt, ~20 ms pinned load vs ~260 ms recompute on an H100).",
    )
    obj_load_ratio: float = Field(
        default=0.3,
        ge=0,
        le=1,
        description="Cost of loading one token's KV from the shared object-store tier (medium OBJ), as a "
        "fraction of recomputing it (plasma loads measured 20-160 ms vs 260 ms recompute for 8K tokens).",
    )
    balance_abs_requests: int = Field(
        default=32,
        ge=0,
        description="Imbalance guard, absolute part: a replica is excluded as hot when its outstanding "
        "requests exceed the least-loaded replica's by more than this AND by the relative factor.",
    )
    balance_rel: float = Field(
        default=1.5,
        ge=1,
        description="Imbalance guard, relative part: hot also requires outstanding > balance_rel x minimum.",
    )
    index_capacity_factor: float = Field(
        default=1.0,
        gt=0,
        description="Approximate-index entries kept per replica, as a multiple of the replica's KV capacity "
        "in blocks (ReplicaStats.num_gpu_blocks).",
    )
    default_capacity_blocks: int = Field(
        default=8192,
        ge=1,
        description="Approximate-index entries per replica until the replica reports its KV capacity.",
    )
    speculative_ttl_s: float = Field(
        default=2.0,
        ge=0,
        description="kv-aware: blocks routed to a replica count as cached there for this long, before its KV "
        "events confirm them (covers bursts of requests sharing a new prefix).",
    )
    recompute_weight: float = Field(
        default=1.0,
        ge=0,
        description="Extra weight on a request's uncached prompt tokens in the routing cost: the cluster-wide "
        "price of recomputing a prefix another replica holds. 0 = pure predicted-TTFT greedy; 1 = leave the "
        "holder only when its queue delay exceeds the recompute time.",
    )
    tie_tolerance: float = Field(
        default=0.1,
        ge=0,
        description="Replicas whose cost is within this fraction of the request's own prefill time of the best "
        "are tied (load estimates are that noisy); ties go to the least recently routed replica, so with no "
        "real signal routing rotates like round-robin.",
    )
    kv_events: bool | None = Field(
        default=None,
        description="Have every replica publish its KV events (through its relay) and the routers subscribe to "
        "them. None: exactly when the strategy reads them (kv-aware). True with another strategy costs the events "
        "without using them (benchmarks isolate their cost that way); False with kv-aware is refused.",
    )
    kv_events_replay: bool = Field(
        default=True,
        description="kv-aware: ask a replica's replay socket for missed event batches (and for the recent "
        "history when an ingress replica subscribes mid-stream).",
    )

    request_router_class: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="Import path ('module:Class') of another Ray Serve RequestRouter for the replica deployments, "
        "used instead of kvserve's (strategy and its knobs are then unused). For head-to-head comparisons, e.g. "
        "benchmarks.routing_h2h.ray_router:RayPrefixCacheAffinity (Ray Serve LLM's PrefixCacheAffinityRouter).",
    )
    request_router_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of request_router_class's initialize_state."
    )

    @model_validator(mode="after")
    def _kwargs_need_class(self) -> RoutingConfig:
        if self.request_router_kwargs and self.request_router_class is None:
            raise ValueError("routing.request_router_kwargs is set but routing.request_router_class is not")
        if self.kv_events is False and self.strategy == "kv-aware":
            raise ValueError("routing.kv_events is false but strategy kv-aware reads KV events; choose prefix-aware "
                             "for routing without them")
        return self

    def publishes_kv_events(self) -> bool:
        """Whether replicas publish KV events and routers subscribe (``kv_events``, else the strategy's need)."""
        return self.strategy == "kv-aware" if self.kv_events is None else self.kv_events

    def seed(self) -> str:
        """The block-hash seed: ``hash_seed``, or PYTHONHASHSEED when ``hash_seed_from_env``."""
        if not self.hash_seed_from_env:
            return self.hash_seed
        from serve_app import settings

        value = settings.get("PYTHONHASHSEED")
        if not value or value == "random":
            raise ValueError("routing.hash_seed_from_env is true but PYTHONHASHSEED is not set to a seed in this "
                             f"process ({value!r}); set it from the hash-seed Secret")
        return value

    def knobs(self) -> Knobs:
        """The policy parameters (plain data for routers/)."""
        return Knobs(
            strategy=self.strategy,
            prefill_s_per_token=self.prefill_s_per_token,
            measured_prefill_speed=self.prefill_speed == "measured",
            running_request_tokens=self.running_request_tokens,
            host_load_ratio=self.host_load_ratio,
            obj_load_ratio=self.obj_load_ratio,
            balance_abs_requests=self.balance_abs_requests,
            balance_rel=self.balance_rel,
            session_affinity=self.session_header is not None,
            index_capacity_factor=self.index_capacity_factor,
            default_capacity_blocks=self.default_capacity_blocks,
            speculative_ttl_s=self.speculative_ttl_s,
            recompute_weight=self.recompute_weight,
            tie_tolerance=self.tie_tolerance,
        )
