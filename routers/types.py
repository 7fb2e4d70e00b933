"""Plain data shared by the router, the replicas and the metrics: the seams between parts.

Owns: ``ReplicaStats`` (what a vLLM replica reports about itself), ``ReplicaSnapshot`` (what a
routing policy sees of one replica at decision time), ``RoutingRequest`` (what a policy sees of one
request) and ``Decision`` (what a policy returns). Pure Python: no ray, fastapi or vllm imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """A replica's self-report, produced by the vLLM replica and polled by Serve's router.

    Attributes:
        replica_id: Serve's unique replica id (``ReplicaID.unique_id``).
        model_id: served model name.
        block_size: KV block size in tokens, read from the engine.
        num_gpu_blocks: KV capacity of the engine, in blocks.
        kv_usage: fraction of KV blocks in use, 0..1.
        num_running: requests the engine is decoding or prefilling.
        num_waiting: requests queued inside the engine.
        queued_prefill_tokens: prompt tokens not yet prefilled (uncached part) over requests waiting
            for their first token on this replica.
        prefill_tokens_per_s: prefill speed as the replica's queue drains (routers.prefill_meter, EWMA), or 0 if
            not yet measured.
        kv_events_endpoint: ZMQ endpoint publishing this replica's vLLM KV events, if enabled.
        timestamp: wall-clock time of the report (seconds).
        recent_cached_tokens: (request id, prompt tokens the engine found cached) of the latest requests
            that got their first output here, newest last (bounded); routers compare them with their
            predictions.
    """

    replica_id: str
    model_id: str
    block_size: int
    num_gpu_blocks: int
    kv_usage: float
    num_running: int
    num_waiting: int
    queued_prefill_tokens: int
    prefill_tokens_per_s: float = 0.0
    kv_events_endpoint: str | None = None
    timestamp: float = 0.0
    recent_cached_tokens: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class ReplicaSnapshot:
    """What a policy sees of one candidate replica when it decides.

    ``queued_prefill_tokens`` and ``running`` are the router adapter's best estimate (the replica's
    last report, aged, merged with the router's own in-flight accounting). ``prefill_tokens_per_s``
    is 0 when not yet measured (the policy then uses its configured per-token cost). ``has_stats`` is
    False while the replica has not reported yet (just started).
    """

    replica_id: str
    queued_prefill_tokens: int = 0
    running: int = 0
    kv_capacity_blocks: int = 0
    kv_usage: float = 0.0
    block_size: int = 16
    max_ongoing: int = 1 << 30
    prefill_tokens_per_s: float = 0.0
    has_stats: bool = True


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """What a policy sees of one request: its prompt as chained KV block hashes."""

    model_id: str
    num_prompt_tokens: int
    block_hashes: tuple[int, ...] = ()
    session_key: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's choice and why it made it."""

    replica_id: str
    reason: str
    predicted_cached_tokens: int = 0
    scores: dict[str, float] = field(default_factory=dict)
