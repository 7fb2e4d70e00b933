"""The messages between the ingress and a vLLM replica (over a Serve deployment handle).

Owns: ``GenerateRequest`` (token ids in, already rendered and tokenized by the ingress, plus the
routing hints the request router reads from ``PendingRequest.args[0]``), ``GenerateChunk`` (one
streamed piece of output), ``InvalidRequestError`` (the engine refused the request's parameters:
the client's fault, never retried) and ``ReplicaUnavailableError`` (the replica's engine is dead: the
ingress retries elsewhere). Plain dataclasses: cheap to pickle, no pydantic on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class GenerateRequest:
    """One generation request, as the replica receives it.

    Attributes:
        request_id: unique id (also the vLLM request id; used to abort).
        model_id: served model name.
        prompt_token_ids: the prompt, tokenized once by the ingress.
        sampling: the request's vLLM ``SamplingParams``, built and validated by the ingress from the OpenAI
            request (vLLM's ``to_sampling_params``: structured outputs, logprobs, logit bias, ...), in
            delta output mode. A plain msgspec struct: it pickles as it is.
        block_hashes: the prompt's chained KV block hashes (low 64 bits, vLLM's algorithm), computed
            by the ingress for routing; empty if the router does not need them.
        session_key: value of the session-affinity header, if configured and present.
        cache_salt: per-tenant salt; part of the first block's hash in vLLM and in the router.
        arrival_time: ingress wall-clock time when the request arrived (seconds).
        dispatched_at: ingress wall-clock time when the request was handed to the deployment handle
            (the replica measures routing + transfer from it).
        trace_headers: W3C trace context (``traceparent``) of the ingress's request span, passed to the
            engine so vLLM's own request span joins the same trace; None when tracing is off.
        reasoning_ended: vLLM's hint for structured outputs under a reasoning parser (the prompt already
            ended the reasoning, or reasoning is not returned); None: no reasoning parser.
        merge_chunks: the replica merges consecutive engine steps into one chunk per its model's
            ``stream_merge_interval_ms`` from the start (the first chunk and the last still go out at once): the
            ingress's event loop was behind when it dispatched the request, or nobody reads the stream as it
            goes (a non-streaming request).
    """

    request_id: str
    model_id: str
    prompt_token_ids: list[int]
    sampling: Any
    block_hashes: tuple[int, ...] = ()
    session_key: str | None = None
    cache_salt: str | None = None
    arrival_time: float = 0.0
    dispatched_at: float = 0.0
    trace_headers: dict[str, str] | None = None
    reasoning_ended: bool | None = None
    merge_chunks: bool = False


@dataclass(slots=True)
class ReplicaTiming:
    """Where a request's time went inside its replica, sent back with its first chunk.

    Wall-clock seconds (``time.time()``), so that the ingress can place them between its own stamps;
    across nodes they are as good as the nodes' clock sync.

    Attributes:
        received_at: the replica's generator started (after routing and the transfer from the ingress).
        first_output_at: the engine produced the request's first output (queueing + prefill done).
        block_size: the engine's KV block size (the ingress hashes prompts with it once it knows it).
    """

    received_at: float
    first_output_at: float
    block_size: int = 0


class InvalidRequestError(ValueError):
    """Raised by a replica before generating when vLLM refuses the sampling parameters; the ingress answers 400.

    Ray re-raises it at the caller as a subclass of both this class and ``RayTaskError``; the message is
    in ``args[0]`` of the original (``RayTaskError.cause``).
    """


class ReplicaUnavailableError(RuntimeError):
    """Raised by a replica whose engine died; the replica is leaving, and the ingress retries the request
    on another replica if nothing reached the client yet."""


#: The log-probabilities of one token position, as vLLM reports them (its order: the chosen token, then the
#: top candidates): (token id, logprob, decoded text or None). None: vLLM reported none for the position.
PositionLogprobs = list[tuple[int, float, str | None]] | None


@dataclass(slots=True)
class GenerateChunk:
    """Output produced since the previous chunk, for every choice that advanced.

    Attributes:
        texts: choice index -> new text.
        token_counts: choice index -> number of new tokens.
        token_ids: choice index -> the new token ids (tool and reasoning parsers read them).
        logprobs: choice index -> one ``PositionLogprobs`` per new token (only when the request asked).
        prompt_logprobs: one entry per prompt token (first chunk; only when the request asked).
        finish_reasons: choice index -> "stop" | "length" | "abort", for choices that finished.
        prompt_tokens: prompt length (set on the first chunk).
        cached_tokens: prompt tokens served from the prefix cache or the KV tier (first chunk).
        replica_id: the replica that served the request (first chunk).
        timing: the replica-side stage stamps (first chunk).
    """

    texts: dict[int, str] = field(default_factory=dict)
    token_counts: dict[int, int] = field(default_factory=dict)
    finish_reasons: dict[int, str] = field(default_factory=dict)
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list[PositionLogprobs]] = field(default_factory=dict)
    prompt_logprobs: list[PositionLogprobs] | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    replica_id: str | None = None
    timing: ReplicaTiming | None = None
