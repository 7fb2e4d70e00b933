"""The cost model of one vLLM replica, step by step: what one engine step costs, KV capacity and
KV-tier loads, in seconds.

Owns ``EngineModel``. The simulator (``scheduler.py``) runs each replica as vLLM's scheduler does: every
step decodes one token for each running request and spends the rest of a ``chunk_tokens`` budget
(``max_num_batched_tokens``) on prefill chunks, oldest request first. Every number is a field so
``calibrate.py`` can fit them to GPU runs and write them back as JSON::

    step(d decoding requests holding k context tokens, prefill chunks of p_i tokens after c_i cached)
        = [ step_s + decode_s_per_seq * d + decode_s_per_ktok * k / 1e3
            + sum_i (p_i / prefill_tokens_per_s + prefill_attn_s * p_i * (c_i + p_i / 2) / 1e6)
            + mixed if prefill_step_contends ]
          x (1 + gpu_contention * (prefilling_peers + decoding_peer_share * (busy_peers - prefilling_peers)))
        + sum_i (p_i / prefill_tokens_per_s + prefill_attn_s * ...) * prefill_contention * prefilling_peers
        + mixed if not prefill_step_contends
    mixed = 0 without chunks; graph_step_s if d + sum_i p_i <= graph_tokens (> 0); else prefill_step_s
    tier_load(t tokens) = t * kv_bytes_per_token / (tier_gbps * 1e9)   (the copy)
    tier_ready(t tokens) = tier_load(t) + tier_hit_s                     (before the request's first chunk)

``prefill_step_s`` is what a step costs for carrying prefill at all (0 by default): on the GPU a step that mixes
prefill with decodes runs outside vLLM's full CUDA graph, and the engine stage's parts measured there put a cached
request's first token 3-4 decode steps after its scheduling (``calibrate --engine-stage`` fits it on the routing
cells; ``calibrate --prefill-step-ms fit`` picks the serving engine's from its c=64 cells' TPOT and throughput).

``graph_tokens`` (0 by default: every step carrying prefill pays ``prefill_step_s``) is the most tokens a step may
schedule (its decodes plus its chunks) and still run from captured CUDA graphs, piecewise around attention when it
mixes prefill with decodes (vLLM's ``max_cudagraph_capture_size``, 512 by default): such a step pays
``graph_step_s`` (0 by default, so a cached request's short chunk costs its own tokens only) instead of
``prefill_step_s``: the attention of a mixed step runs outside the piecewise graphs, and the GPU's iteration log puts
such a step's wait between a decode step's and a larger prefill step's (``routing_h2h.steps``).

``prefill_step_contends`` (True by default) stretches that surcharge with the step's contention, as GPU time; False
adds it after, as time the engine spends outside the GPU's sharing (the CPU of an eager step: launching its kernels).
``decoding_peer_share`` (1 by default) is what a busy peer whose step carries no prefill counts for in that
contention against one whose step does (``calibrate --decoding-peer-share`` fits it; what co-located engines cost
each other on a GPU is measured by ``benchmarks/gpu/colocated_contention.py``).
``prefill_contention`` (0 by default) is what prefill chunks cost more per peer prefilling at once: prefill is
compute-bound, so two co-located engines prefilling share the GPU's arithmetic, where the decode steps of a small
model are short memory-bound kernels that overlap a peer's (``gpu_contention``, on the whole step).

``tier_hit_s`` is what a tier hit costs beyond the copy (the directory lookup, the connector's
scheduling, the wait for the store): fixed per hit, it delays that request's first chunk only (the
replica keeps stepping its other requests meanwhile).

The ingress replica (proxy + ingress process) is one CPU core per ingress (``frontend.py``): each
request costs ``frontend_s_per_request`` before it is routed and each streamed token
``frontend_s_per_token`` on the way back. ``frontend_sharing`` "ps" (the default) shares the core
equally among the requests with work pending, as the ingress's asyncio loop interleaves them: a
token reaches the client once its request's share has done that work, and a request is done for the
client (closed loop: its next one is sent) when its last token has. "fifo" is one queue: a request
is routed, and a first token seen, once everything queued before it is done (the per-token work
then only delays later arrivals; the engine's completion is the client's). "loop" is the ingress's asyncio
loop as kvserve runs it: one queue of callbacks served in arrival order, where every streamed chunk is a
callback of ``frontend_s_per_token`` queued when its engine step ends (a step's tokens for every stream at
once), and a new request's work before routing crosses the loop in ``frontend_hops`` equal callbacks (the
handle call, the routing decision, the send), each queued behind whatever arrived while the previous ran. A
token reaches the client when its chunk's callback has run. While the loop was busy more than
``frontend_merge_busy`` of the last second (off again below 0.6 of it; 0: never), the streams it routes send
at most one chunk per ``frontend_merge_interval_s`` for their life, the first and the last at once, as
kvserve's ingress asks its replicas to (``GenerateRequest.merge_chunks``).
``ingress_balance`` is how the load balancer in front spreads requests over the ingress replicas: "round-robin"
(the default: by request number) or "leastconn", what Serve's HAProxy does by default
(``RAY_SERVE_HAPROXY_BALANCE_ALGORITHM``): the ingress with the fewest requests open (taken, last token not yet
streamed), round-robin among equals. With a closed loop whose every worker holds one session (``--session-width``
equal to the concurrency), a worker's next turn is sent just after its last ended, so leastconn sends it back to the
ingress that streamed that one more often than not, and a prefix-aware ingress then knows the session's prefix.
The load generator (``kvserve bench``: one asyncio process per ``--processes``) is ``client_cores`` more
cores, each serving the requests of its process (request ``rid`` on core ``rid % client_cores``, or its bench
process's, ``path.client_of``): ``client_s_per_request`` to build and send a request (after the client's clock starts,
before the ingress sees it) and ``client_s_per_token`` to read and parse each streamed token. The client sees a first
token, and a closed-loop worker sends its next request, once its core has done that work; 0 (the default) is a
client of infinite speed. ``client_sharing`` is how a core serves them: "ps" (the default) shares it equally among
the requests with work pending; "fifo" runs each piece of work (a send, a token read) as one callback in the order
queued, as the bench process's asyncio loop does (``frontend.QueueServer``).
``tokenize_hold_s`` (0 by default): how long the ingress's event loop is held tokenising a chat prompt
(``Turn.text``), which kvserve's ingress does inline for a prompt up to ``deployments.ingress._INLINE_CHARS``: nothing
else on that ingress (no other request's work, chunk or decision) runs meanwhile; the request is routed once it
ends (``calibrate --tokenize-profile`` measures it from py-spy profiles of the GPU runs' ingresses).
``empty_first_share`` (0 by default): the share of token-id prompts (``/v1/completions``; a chat prompt's first token
always carried text on the GPU) whose first output token decodes to no text, so that the client's TTFT, its first
token with text, is its second token (``text_from``: chosen by a hash of the request's number, no random draw); the
model's property, not the load's (``calibrate --first-text`` measures it from the bench's per-request records).
Ray's router (its twin, ``ray_twin.py``) calls its prefix tree actor with a synchronous ``ray.get`` on the ingress's
event loop twice per request: the match before the decision, the insert once the replica has taken the request.
Each call holds the whole loop (no other request's work, chunk or decision runs meanwhile) for ``tree_call_s`` plus
``tree_call_s_per_ktok`` per 1K prompt tokens (``tree_call_hold_s``): decisions queue behind one another and behind
the loop's work, so a burst of arrivals waits for the calls of every request ahead of it. Both 0 by default.
``ray_reply_s`` is how long after the replica has taken a request Serve has its reply to the send, when Ray's router
learns the prompt (``on_request_routed``: the insert) and Serve's queue-length cache the replica's count; 0 by
default (``calibrate --ray-reply`` sets it from the GPU's decision-to-insert times).
Each engine replica has its own front end (vLLM's input processing: tokenisation and the hop to the
engine core), one FIFO server costing ``input_s_per_request`` plus ``input_s_per_ktok`` per 1K prompt
tokens (``input_s``: what grows with the prompt, such as its block hashes and the token ids' trip to
the engine core) before the request reaches the scheduler. The same server carries the replica's streaming:
each output token it streams costs ``replica_s_per_token`` there (the replica's event loop sending the
chunk back through Serve), so a request arriving at a replica that streams many tokens waits longer before
its input is processed (the dispatch stage of kvserve's stage histograms). ``request_overhead_s`` is the rest of the
serving latency at concurrency 1, added to every TTFT and end-to-end time without queueing.

KV capacity: ``kv_blocks`` per replica bound its prefix cache (an LRU). With ``kv_admission`` they
are one pool for the cache and what runs, as vLLM's block pool is (``replica.py``): a waiting request
is scheduled only once free + evictable blocks cover its whole length (prompt and output; prompt
blocks already held by another admitted request counted once), in queue order, as vLLM's scheduler
stops at the first request it cannot allocate; held blocks are never evicted, and the cached blocks
no request holds are evicted oldest first to make room (vLLM allocates as tokens come and preempts
when out of blocks; reserving the whole length up front is that without preemption). Off by default: on
for runs whose KV size is known (the routing runs' ``num_gpu_blocks_override``), not for the serving
JSON, which does not record it.

Asynchronous scheduling (``async_scheduling``, vLLM's default since it keeps a batch queue of two):
the engine core forms step k+1 while step k runs, so a request that reaches it while step k runs
joins step k+2 at the earliest, one step later than a synchronous scheduler would take it; an idle
engine takes it at once. The steps' lengths and the tokens they stream are the same either way.

``busy_peers`` counts the other replicas on the same GPU stepping when a step starts (``replicas_per_gpu`` > 1
models fractional-GPU deployments such as configs/gpu-routing.yaml, whose engines time-share one GPU), and
``prefilling_peers`` those of them whose step carries prefill.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True, slots=True)
class EngineModel:
    prefill_tokens_per_s: float = 10_000.0
    prefill_attn_s: float = 0.0
    prefill_step_s: float = 0.0
    step_s: float = 0.02
    decode_s_per_seq: float = 0.0
    decode_s_per_ktok: float = 0.0
    chunk_tokens: int = 8192
    async_scheduling: bool = False
    gpu_contention: float = 0.0
    decoding_peer_share: float = 1.0
    prefill_contention: float = 0.0
    prefill_step_contends: bool = True
    graph_tokens: int = 0
    graph_step_s: float = 0.0
    replicas_per_gpu: int = 1
    request_overhead_s: float = 0.0
    input_s_per_request: float = 0.0
    input_s_per_ktok: float = 0.0
    replica_s_per_token: float = 0.0
    frontend_s_per_request: float = 0.0
    frontend_s_per_token: float = 0.0
    frontend_tokenize_s: float = 0.0
    frontend_hash_s_per_ktok: float = 0.0
    frontend_sharing: str = "ps"
    ingress_balance: str = "round-robin"
    frontend_hops: int = 1
    frontend_merge_busy: float = 0.0
    frontend_merge_interval_s: float = 0.02
    client_s_per_request: float = 0.0
    client_s_per_token: float = 0.0
    client_cores: int = 1
    client_sharing: str = "ps"
    tokenize_hold_s: float = 0.0
    empty_first_share: float = 0.0
    tree_call_s: float = 0.0
    tree_call_s_per_ktok: float = 0.0
    ray_reply_s: float = 0.0
    kv_blocks: int = 4096
    kv_admission: bool = False
    block_size: int = 16
    kv_bytes_per_token: int = 32_768
    tier_gbps: float = 10.0
    tier_hit_s: float = 0.0
    max_ongoing: int = 256
    stats_period_s: float = 1.0

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s <= 0 or self.tier_gbps <= 0 or self.step_s <= 0:
            raise ValueError("prefill_tokens_per_s, step_s and tier_gbps must be > 0")
        if self.frontend_sharing not in ("ps", "fifo", "loop"):
            raise ValueError(f"frontend_sharing must be 'ps', 'fifo' or 'loop', not {self.frontend_sharing!r}")
        if self.client_sharing not in ("ps", "fifo"):
            raise ValueError(f"client_sharing must be 'ps' or 'fifo', not {self.client_sharing!r}")
        if self.ingress_balance not in ("round-robin", "leastconn"):
            raise ValueError(f"ingress_balance must be 'round-robin' or 'leastconn', not {self.ingress_balance!r}")
        if self.frontend_hops < 1 or not 0 <= self.frontend_merge_busy <= 1 or self.frontend_merge_interval_s <= 0:
            raise ValueError("frontend_hops must be >= 1, frontend_merge_busy within 0-1 and "
                             "frontend_merge_interval_s > 0")
        if not 0 <= self.empty_first_share < 1:
            raise ValueError(f"empty_first_share must be within [0, 1), got {self.empty_first_share}")
        if not 0 <= self.decoding_peer_share <= 1:
            raise ValueError(f"decoding_peer_share must be within [0, 1], got {self.decoding_peer_share}")
        if self.tier_hit_s < 0 or self.prefill_step_s < 0 or self.prefill_contention < 0 or self.tokenize_hold_s < 0:
            raise ValueError("tier_hit_s, prefill_step_s, prefill_contention and tokenize_hold_s must be >= 0")
        if self.input_s_per_request < 0 or self.input_s_per_ktok < 0 or self.replica_s_per_token < 0:
            raise ValueError("input_s_per_request, input_s_per_ktok and replica_s_per_token must be >= 0")
        if self.frontend_tokenize_s < 0 or self.frontend_hash_s_per_ktok < 0:
            raise ValueError("frontend_tokenize_s and frontend_hash_s_per_ktok must be >= 0")
        if self.client_s_per_request < 0 or self.client_s_per_token < 0:
            raise ValueError("client_s_per_request and client_s_per_token must be >= 0")
        if self.tree_call_s < 0 or self.tree_call_s_per_ktok < 0 or self.ray_reply_s < 0:
            raise ValueError("tree_call_s, tree_call_s_per_ktok and ray_reply_s must be >= 0")
        if self.graph_tokens < 0 or self.graph_step_s < 0:
            raise ValueError(f"graph_tokens and graph_step_s must be >= 0, got {self.graph_tokens} and "
                             f"{self.graph_step_s}")
        if (self.kv_blocks < 1 or self.block_size < 1 or self.replicas_per_gpu < 1 or self.chunk_tokens < 1
                or self.client_cores < 1):
            raise ValueError("kv_blocks, block_size, chunk_tokens, replicas_per_gpu and client_cores must be >= 1")

    def text_from(self, rid: int, text: bool, output_tokens: int) -> int:
        """Which output token of request ``rid`` is the first with text: 2 for a share ``empty_first_share`` of the
        token-id prompts with more than one output token (a multiplicative hash of ``rid``), else 1."""
        if text or output_tokens < 2 or self.empty_first_share <= 0:
            return 1
        return 2 if (rid * 2654435761 % 2**32) / 2**32 < self.empty_first_share else 1

    def prefill_chunk_s(self, tokens: int, cached: int) -> float:
        """GPU time of a prefill chunk of ``tokens`` following ``cached`` tokens already in KV."""
        return tokens / self.prefill_tokens_per_s + self.prefill_attn_s * tokens * (cached + tokens / 2) / 1e6

    def step_time_s(self, decoding: int, context_tokens: int, prefill_s: float, busy_peers: int,
                    prefilling_peers: int = 0, prefill_tokens: int | None = None) -> float:
        """One engine step: fixed cost, the decode batch, the prefill chunks (``prefill_s`` of ``prefill_tokens``
        tokens, plus ``prefill_step_s`` for a step that carries any and schedules more than ``graph_tokens``,
        ``graph_step_s`` for one within them), contention with the peers stepping and, for the chunks, with those
        prefilling."""
        base = self.step_s + self.decode_s_per_seq * decoding + self.decode_s_per_ktok * context_tokens / 1e3
        in_graph = (self.graph_tokens > 0 and prefill_tokens is not None
                    and decoding + prefill_tokens <= self.graph_tokens)
        mixed = 0.0 if prefill_s <= 0 else self.graph_step_s if in_graph else self.prefill_step_s
        shared, apart = (mixed, 0.0) if self.prefill_step_contends else (0.0, mixed)
        peers = prefilling_peers + self.decoding_peer_share * (busy_peers - prefilling_peers)
        return ((base + prefill_s + shared) * (1 + self.gpu_contention * peers)
                + prefill_s * self.prefill_contention * prefilling_peers + apart)

    def prepare_s(self, prompt_tokens: int, *, text: bool, hashed: bool) -> float:
        """The ingress's work on one request before it is routed: the fixed part, the tokeniser for a text
        prompt (token ids are not tokenised) and the block hashes where the strategy hashes."""
        return (self.frontend_s_per_request + (self.frontend_tokenize_s if text else 0.0)
                + (self.frontend_hash_s_per_ktok * prompt_tokens / 1e3 if hashed else 0.0))

    def input_s(self, prompt_tokens: int) -> float:
        """The replica's front end for one request: fixed, plus a part per prompt token."""
        return self.input_s_per_request + self.input_s_per_ktok * prompt_tokens / 1e3

    def tree_call_hold_s(self, prompt_tokens: int) -> float:
        """How long one synchronous call of Ray's router to its tree actor holds the ingress's loop."""
        return self.tree_call_s + self.tree_call_s_per_ktok * prompt_tokens / 1e3

    def tier_load_s(self, tokens: int) -> float:
        """The copy of ``tokens`` tokens' KV from the tier at ``tier_gbps``."""
        return tokens * self.kv_bytes_per_token / (self.tier_gbps * 1e9)

    def tier_ready_s(self, tokens: int) -> float:
        """From the scheduler's lookup to the loaded blocks being usable: the copy plus the fixed cost of a hit."""
        return self.tier_load_s(tokens) + self.tier_hit_s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EngineModel:
        """Build from a JSON object; unknown keys are an error (a typo must not fall back to a default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EngineModel fields: {unknown}")
        return cls(**data)

    def with_(self, **changes) -> EngineModel:
        return replace(self, **changes)
