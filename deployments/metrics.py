"""Every metric the project exports, defined once.

Owns: metric names, units, label sets and bucket boundaries. Uses ``ray.util.metrics``: each Ray
process (ingress replica, vLLM replica, KV-tier engine core) records into its node's metrics agent,
which serves Prometheus text on the node's metrics-export port (8080 on KubeRay pods, where the
PodMonitor scrapes). A prometheus-client registry would live in one process and be invisible from
the others; Ray's agent aggregates all processes of a node in one scrape.

Naming: the HyperPod names users know (``model_invocations_total``, ``model_latency_milliseconds``,
``model_ttfb_milliseconds``, ``model_concurrent_requests``) and ``kvserve_*`` for the project's own;
Ray's exporter prepends its ``ray_`` namespace to all of them (``ray_model_invocations_total``).
Labels are per model / replica / status / strategy / configured tenant, never per request or per key.
Metrics are created lazily (one set per process) so importing this module costs nothing and needs no
running Ray.
"""

from __future__ import annotations

import functools

# Bucket boundaries in milliseconds: 1 ms .. 10 min, roughly x2 per step.
LATENCY_MS_BUCKETS = [
    1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000,
    7500, 10000, 20000, 30000, 60000, 120000, 300000, 600000,
]
# Stage durations in milliseconds: 50 us .. 10 s (most stages take well under a millisecond).
STAGE_MS_BUCKETS = [0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 35, 50, 75, 100, 200, 500,
                    1000, 2000, 5000, 10000]
#: Finer around the tens of milliseconds a cached request spends in a busy engine.
ENGINE_PART_MS_BUCKETS = [0.25, 0.5, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 18, 22, 26, 30, 35, 40, 45, 50, 60, 70, 85, 100,
                          150, 200, 300, 500, 1000, 2000, 5000, 10000, 20000, 60000]
MICROSECOND_BUCKETS = [1, 2, 5, 10, 20, 35, 50, 75, 100, 200, 500, 1000, 5000, 20000]
# Token-count buckets for routing predictions (cached prompt tokens, prediction error).
TOKEN_BUCKETS = [1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]


class _Metrics:
    """Lazily created ray.util.metrics objects (one instance per process)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        # --- ingress: request-level (HyperPod names) ---
        self.invocations = Counter(
            "model_invocations", description="Requests handled, by model and outcome.",
            tag_keys=("model", "status"),
        )
        self.latency_ms = Histogram(
            "model_latency_milliseconds", description="End-to-end request latency.",
            boundaries=LATENCY_MS_BUCKETS, tag_keys=("model", "status"),
        )
        self.ttfb_ms = Histogram(
            "model_ttfb_milliseconds", description="Time to first byte of generated output (TTFT).",
            boundaries=LATENCY_MS_BUCKETS, tag_keys=("model", "status"),
        )
        self.concurrent = Gauge(
            "model_concurrent_requests", description="Requests in flight in this ingress replica.",
            tag_keys=("model",),
        )
        self.prompt_tokens = Counter(
            "kvserve_prompt_tokens", description="Prompt tokens processed.", tag_keys=("model",)
        )
        self.completion_tokens = Counter(
            "kvserve_completion_tokens", description="Completion tokens generated.", tag_keys=("model",)
        )
        self.cached_tokens = Counter(
            "kvserve_cached_prompt_tokens",
            description="Prompt tokens served from the prefix cache or the KV tier.", tag_keys=("model",),
        )
        # --- auth (deployments.auth): refusals before any model is involved ---
        # ``tenant`` is a configured tenant, or "unknown" for a 401 (a key that names no tenant never becomes a label).
        self.auth_rejected_requests = Counter(
            "kvserve_auth_rejected_requests",
            description="Requests refused with 401, by reason (missing_key, invalid_key); tenant is 'unknown'.",
            tag_keys=("reason", "tenant"),
        )
        self.rate_limited_requests = Counter(
            "kvserve_rate_limited_requests",
            description="Requests refused with 429 by their tenant's limit, by reason (requests_per_min, "
            "tokens_per_min) and tenant.", tag_keys=("reason", "tenant"),
        )
        # --- overload (deployments.admission): refusals beyond the models' bounded queues, before any work ---
        self.admission_rejected_requests = Counter(
            "kvserve_admission_rejected_requests",
            description="Generation requests answered 503 overloaded by the ingress's in-flight bound (the models' "
            "queues full), before their body was read.",
        )
        # --- request-path stages (deployments.stages.STAGES), one histogram each ---
        from deployments.stages import STAGES

        self.stage_ms = {
            stage: Histogram(
                f"kvserve_stage_{stage}_milliseconds",
                description=f"Time in the request-path stage '{stage}' before the first byte (deployments/stages.py).",
                boundaries=STAGE_MS_BUCKETS, tag_keys=("model", "replica"),
            )
            for stage in STAGES
        }
        from deployments.stages import ENGINE_PARTS

        self.engine_part_ms = {
            part: Histogram(
                f"kvserve_engine_{part}_milliseconds",
                description=f"The replica's engine stage, part '{part}', from vLLM's request stats "
                "(deployments/stages.py: engine_parts_ms).",
                boundaries=ENGINE_PART_MS_BUCKETS, tag_keys=("model", "replica"),
            )
            for part in ENGINE_PARTS
        }
        self.route_wait_ms = Histogram(
            "kvserve_stage_route_milliseconds",
            description="From the handle call to the routing decision (Serve's queueing + the decision), per request.",
            boundaries=STAGE_MS_BUCKETS, tag_keys=("model",),
        )
        self.ingress_loop_lag_ms = Gauge(
            "kvserve_ingress_loop_lag_milliseconds",
            description="How late an ingress replica's event loop (requests, streaming, routing and KV events share "
            "it) runs its timers (smoothed).", tag_keys=("replica",),
        )
        self.ingress_loop_busy_ratio = Gauge(
            "kvserve_ingress_loop_busy_ratio",
            description="Share of wall time an ingress replica's event-loop thread spent on a CPU (about the last "
            "second).", tag_keys=("replica",),
        )
        # --- vLLM replica ---
        self.replica_queued_prefill_tokens = Gauge(
            "kvserve_replica_queued_prefill_tokens",
            description="Uncached prompt tokens waiting for prefill on a replica.", tag_keys=("model", "replica"),
        )
        self.replica_loop_lag_ms = Gauge(
            "kvserve_replica_loop_lag_milliseconds",
            description="How late a replica's event loop runs its timers (smoothed); above the model's "
            "stream_merge_lag_ms its streams merge engine steps into fewer chunks.", tag_keys=("model", "replica"),
        )
        self.replica_loop_busy_ratio = Gauge(
            "kvserve_replica_loop_busy_ratio",
            description="Share of wall time a replica's event-loop thread spent on a CPU (about the last second): "
            "a loop that lags while this is low waits for the GIL or the host's cores, not for its own work.",
            tag_keys=("model", "replica"),
        )
        self.replica_running = Gauge(
            "kvserve_replica_running_requests", description="Requests running in a replica's engine.",
            tag_keys=("model", "replica"),
        )
        # --- routing (section owned by the routing work) ---
        self.router_decisions = Counter(
            "kvserve_router_decisions", description="Routing decisions, by policy and reason (routers.policy.REASONS).",
            tag_keys=("model", "strategy", "reason"),
        )
        self.router_decision_latency_us = Histogram(
            "kvserve_router_decision_latency_microseconds",
            description="Time to build snapshots and choose a replica, per decision.",
            boundaries=MICROSECOND_BUCKETS, tag_keys=("strategy",),
        )
        self.router_predicted_cached_tokens = Counter(
            "kvserve_router_predicted_cached_tokens",
            description="Prompt tokens the router predicted to be reusable on the replica it sent each request to.",
            tag_keys=("model", "strategy"),
        )
        self.router_actual_cached_tokens = Counter(
            "kvserve_router_actual_cached_tokens",
            description="Prompt tokens the engine actually reused (num_cached_tokens), for routed requests.",
            tag_keys=("model", "strategy"),
        )
        self.router_prediction_error_tokens = Histogram(
            "kvserve_router_cached_tokens_prediction_error_tokens",
            description="|predicted - actual| cached prompt tokens per request.",
            boundaries=TOKEN_BUCKETS, tag_keys=("model", "strategy"),
        )
        self.router_index_blocks = Gauge(
            "kvserve_router_index_blocks",
            description="Block entries in the router's prefix index per replica (approximate + precise).",
            tag_keys=("model", "replica", "strategy"),
        )
        view = ("model", "replica", "strategy")  # what the policy saw of each replica, set at most once a second
        self.router_outstanding_requests = Gauge(
            "kvserve_router_outstanding_requests",
            description="Requests this router sent to a replica whose completion it has not seen (its own count).",
            tag_keys=view,
        )
        self.router_queued_prefill_tokens = Gauge(
            "kvserve_router_queued_prefill_tokens",
            description="Queued prefill tokens of a replica as the policy saw them (its report, aged, and the "
            "router's own accounting).", tag_keys=view,
        )
        self.router_prefill_tokens_per_s = Gauge(
            "kvserve_router_prefill_tokens_per_s",
            description="Prefill rate of a replica as the policy saw it (0: not measured yet, the configured cost).",
            tag_keys=view,
        )
        self.router_kv_events = Counter(
            "kvserve_router_kv_events", description="KV events applied to the precise index.",
            tag_keys=("model", "replica"),
        )
        self.router_kv_event_resets = Counter(
            "kvserve_router_kv_event_resets",
            description="Times a replica's precise entries were dropped (lost event batches, restart, failure).",
            tag_keys=("model", "replica"),
        )
        # --- KV tier (section owned by the KV-tier work) ---
        # Recorded in the engine-core process (scheduler: hits/misses; worker: stores, loads) and
        # in the directory actor (evictions, lost blocks, directory bytes). The engine core is its
        # own Ray driver; ray.util.metrics from a driver reaches the node's metrics agent
        # (checked on Ray 2.60: Component="core_worker").
        tier = ("model",)
        self.kv_tier_hit_blocks = Counter(
            "kvserve_kv_tier_hit_blocks", description="KV blocks loaded from the tier (beyond the local prefix hit).",
            tag_keys=tier,
        )
        self.kv_tier_miss_blocks = Counter(
            "kvserve_kv_tier_miss_blocks",
            description="Loadable KV blocks beyond the local prefix hit that the tier did not hold.", tag_keys=tier,
        )
        self.kv_tier_hit_tokens = Counter(
            "kvserve_kv_tier_hit_tokens", description="Prompt tokens loaded from the tier.", tag_keys=tier
        )
        self.kv_tier_miss_tokens = Counter(
            "kvserve_kv_tier_miss_tokens", description="Loadable prompt tokens the tier did not hold.", tag_keys=tier
        )
        self.kv_tier_stored_bytes = Counter(
            "kvserve_kv_tier_stored_bytes", description="Bytes of KV put into the object store.", tag_keys=tier
        )
        self.kv_tier_dropped_stores = Counter(
            "kvserve_kv_tier_dropped_stores",
            description="Chunk stores skipped (staging busy or object store full).", tag_keys=tier,
        )
        self.kv_tier_load_latency_ms = Histogram(
            "kvserve_kv_tier_load_latency_milliseconds",
            description="Time to load one request's tier hit into its KV blocks.",
            boundaries=LATENCY_MS_BUCKETS, tag_keys=tier,
        )
        self.kv_tier_load_phase_ms = Histogram(
            "kvserve_kv_tier_load_phase_milliseconds",
            description="Time of each phase of one tier load (kv_tier.directory.LOAD_PHASES: queue for a loader "
                        "thread, directory locate, ray.get of the chunks, H2D copy up to its sync).",
            boundaries=STAGE_MS_BUCKETS, tag_keys=(*tier, "phase"),
        )
        self.kv_tier_load_failed_blocks = Counter(
            "kvserve_kv_tier_load_failed_blocks",
            description="Blocks whose load failed (lost or evicted object) and were recomputed.", tag_keys=tier,
        )
        self.kv_tier_evicted_blocks = Counter(
            "kvserve_kv_tier_evicted_blocks", description="Blocks evicted from the tier by its byte budget (LRU).",
            tag_keys=tier,
        )
        self.kv_tier_lost_blocks = Counter(
            "kvserve_kv_tier_lost_blocks",
            description="Blocks dropped from the directory because their object was lost (owner died).",
            tag_keys=tier,
        )
        self.kv_tier_directory_bytes = Gauge(
            "kvserve_kv_tier_directory_bytes", description="Bytes of KV the tier's directory holds.", tag_keys=tier
        )


@functools.cache
def metrics() -> _Metrics:
    """This process's metric objects (created on first use)."""
    return _Metrics()
