"""The vLLM replica deployment: one engine (vLLM ``AsyncLLM``) per Ray Serve replica.

Owns: ``VLLMReplica`` (a plain class Serve wraps), ``placement_bundles`` (bundles derived from
tensor_parallel_size) and ``build_replica`` (the one place that applies ``serve.deployment``).

A replica generates from token ids (the ingress tokenized once), streams ``GenerateChunk``s back,
aborts the engine request when the caller goes away (Serve cancels this generator when the HTTP
client disconnects), and reports ``ReplicaStats`` to Serve's request router through
``record_routing_stats``. When its engine dies it fails the requests it holds with
``ReplicaUnavailableError`` (the ingress retries them elsewhere) and leaves at once, killing the engine's
processes, so Serve replaces it instead of routing more requests to a replica that fails fast; when
requests are running and the engine has made no step for ``engine_stall_timeout_s`` (a hung or stopped
engine) its health check fails and it leaves the same way. Engine construction and stat collection
live in ``deployments.engine``; this module is the Serve-facing shell.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from deployments.engine import Engine, EngineStats, kill_children_and_exit, start_engine
from deployments.heap import freeze_startup_heap
from deployments.metrics import metrics
from deployments.pacing import LoopLag, StreamPacer
from deployments.prefix_view import PrefixView
from deployments.protocol import (
    GenerateChunk,
    GenerateRequest,
    InvalidRequestError,
    PositionLogprobs,
    ReplicaTiming,
    ReplicaUnavailableError,
)
from deployments.stages import record_engine_parts
from routers.prefill_meter import PrefillMeter
from routers.types import ReplicaStats
from serve_app.config import AppConfig, ModelConfig

logger = logging.getLogger(__name__)

#: When Serve loaded this module into the replica's process (the first step of a replica's start after Ray's own).
_MODULE_LOADED = time.time()

#: (request id, cached prompt tokens) of this many latest first outputs travel in every stats report, so that
#: each router can compare them with what it predicted (a sample when more start per stats period).
RECENT_FIRST_OUTPUTS = 256


def placement_bundles(model: ModelConfig) -> tuple[list[dict[str, float]], str]:
    """Placement-group bundles and strategy of one replica, derived from tensor_parallel_size.

    GPU replicas (``ray_actor_options.num_gpus`` > 0, fractions allowed for several replicas on one
    GPU) get one ``{"GPU": num_gpus}`` bundle per tensor-parallel rank, plus a sliver of the
    accelerator-type resource when one is named so the autoscaler launches the right node type.
    The replica actor's own CPUs are added to bundle 0, where Serve places the actor. CPU replicas
    get a single ``{"CPU": num_cpus}`` bundle.
    """
    actor = model.deployment.ray_actor_options
    num_cpus = float(actor.get("num_cpus", 1))
    gpus = float(actor.get("num_gpus", 0) or 0)
    if gpus <= 0:
        if model.tensor_parallel_size > 1:
            raise ValueError(f"model {model.id}: tensor_parallel_size > 1 needs ray_actor_options.num_gpus > 0")
        return [{"CPU": num_cpus}], model.placement_group_strategy
    rank: dict[str, float] = {"GPU": gpus}
    if model.accelerator_type:
        rank[f"accelerator_type:{model.accelerator_type}"] = 0.001
    bundles = [dict(rank) for _ in range(model.tensor_parallel_size)]
    bundles[0]["CPU"] = num_cpus
    return bundles, model.placement_group_strategy


def position_logprobs(positions: Any) -> list[PositionLogprobs]:
    """vLLM's per-position logprob dicts (token id -> Logprob, in its order) as plain tuples for the ingress."""
    return [None if pos is None else [(tid, lp.logprob, lp.decoded_token) for tid, lp in pos.items()]
            for pos in positions]


class VLLMReplica:
    """One vLLM engine behind a Serve replica."""

    async def __init__(self, model: dict[str, Any], app: dict[str, Any]) -> None:
        init_at = time.time()
        log_like_serve()
        self._model = ModelConfig.model_validate(model)
        self._app = AppConfig.model_validate(app)
        from ray import serve

        ctx = serve.get_replica_context()
        self._replica_id = ctx.replica_id.unique_id
        self._engine: Engine = await start_engine(self._model, self._app)
        self._stats = self._engine.stats
        self._kv_events_endpoint = self._engine.kv_events_endpoint
        # request -> (uncached, hashes, monotonic arrival) until its first output
        self._inflight_prefill: dict[str, tuple[int, tuple[int, ...], float]] = {}
        routing = self._app.routing
        self._view = PrefixView(block_size=self._stats.block_size, num_gpu_blocks=self._stats.num_gpu_blocks,
                                algo=routing.hash_algo, seed=routing.seed())
        self._recent_cached: collections.deque[tuple[str, int]] = collections.deque(maxlen=RECENT_FIRST_OUTPUTS)
        self._streams = 0
        self._meter = PrefillMeter()  # the prefill speed the routers age and price queues with
        self._leaving = False
        self._busy_since = 0.0
        self._watch = asyncio.get_running_loop().create_task(self._watch_engine())
        self._lag = LoopLag(self._model.stream_merge_lag_ms / 1000)
        self._lag_probe = asyncio.get_running_loop().create_task(self._lag.run())
        logger.info("replica %s of %s ready (block_size=%d, num_gpu_blocks=%d)", self._replica_id,
                    self._model.id, self._stats.block_size, self._stats.num_gpu_blocks)
        logger.info("replica startup %s", json.dumps(startup_times(init_at, getattr(self._engine, "startup", {}))))
        freeze_startup_heap(f"replica {self._replica_id}")

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream the output of one request; abort it in the engine if the caller cancels."""
        received_at = time.time()
        n_prompt = len(req.prompt_token_ids)
        # Queued prefill work: the uncached part, as this replica's own history tells (the engine says at first
        # output).
        hashes = tuple(self._view.hashes(req.prompt_token_ids, req.block_hashes, req.cache_salt))
        self._inflight_prefill[req.request_id] = (max(n_prompt - self._view.cached_tokens(hashes), 0), hashes,
                                                  time.monotonic())
        if self._streams == 0:
            self._busy_since = time.monotonic()
        self._streams += 1
        chunk: GenerateChunk | None = None
        pacer = StreamPacer(self._lag, self._model.stream_merge_interval_ms / 1000,
                            merge=req.merge_chunks and self._model.stream_merge_lag_ms > 0)
        first = True
        finished = False
        try:
            async for out in self._engine_outputs(req):
                if chunk is None:
                    chunk = GenerateChunk()
                if first:
                    self._on_first_output(req.request_id, n_prompt, out.num_cached_tokens or 0)
                    chunk.prompt_tokens = n_prompt
                    chunk.cached_tokens = out.num_cached_tokens or 0
                    chunk.replica_id = self._replica_id
                    first_at = time.time()
                    chunk.timing = ReplicaTiming(received_at, first_at, self._stats.block_size)
                    record_engine_parts(self._model.id, self._replica_id, getattr(out, "metrics", None),
                                        first_at - received_at)
                    if getattr(out, "prompt_logprobs", None) is not None:
                        chunk.prompt_logprobs = position_logprobs(out.prompt_logprobs)
                for c in out.outputs:
                    if c.text or c.token_ids:
                        chunk.texts[c.index] = chunk.texts.get(c.index, "") + c.text
                        chunk.token_counts[c.index] = chunk.token_counts.get(c.index, 0) + len(c.token_ids)
                        chunk.token_ids.setdefault(c.index, []).extend(c.token_ids)
                        if getattr(c, "logprobs", None) is not None:
                            chunk.logprobs.setdefault(c.index, []).extend(position_logprobs(c.logprobs))
                    if c.finish_reason is not None:
                        chunk.finish_reasons[c.index] = c.finish_reason
                finished = out.finished
                # Every engine step is a chunk of its own unless this replica's loop lags (deployments.pacing).
                if pacer.due(time.perf_counter(), finished):
                    first = False
                    yield chunk
                    chunk = None
        finally:
            self._streams -= 1
            self._inflight_prefill.pop(req.request_id, None)  # left before its first output
            if not finished and not self._engine.errored:
                # Cancelled (client went away) or failed: free the engine's slot now.
                await self._engine.abort(req.request_id)

    async def _engine_outputs(self, req: GenerateRequest) -> AsyncIterator[Any]:
        """The engine's outputs; its death becomes ReplicaUnavailableError and makes this replica leave, and a
        request the engine refuses before its first output becomes InvalidRequestError."""
        first = True
        try:
            async for out in self._engine.generate(req):
                first = False
                yield out
        except InvalidRequestError:
            raise
        except self._engine.dead_errors:
            self._leave("the engine died")
            raise ReplicaUnavailableError(f"the engine of replica {self._replica_id} died") from None
        except self._engine.client_errors as err:
            if not first:
                raise
            raise InvalidRequestError(f"the engine refused the request: {err}") from None

    def _leave(self, why: str) -> None:
        """Exit shortly (the failing requests get their errors out first); Serve starts a replacement."""
        if not self._leaving:
            self._leaving = True
            asyncio.get_running_loop().call_later(0.5, kill_children_and_exit, f"replica {self._replica_id}: {why}")

    async def _watch_engine(self) -> None:
        """Notice an engine that died while no request was running."""
        while not self._leaving:
            if self._engine.errored:
                self._leave("the engine died")
            await asyncio.sleep(1.0)

    def _on_first_output(self, request_id: str, n_prompt: int, n_cached: int) -> None:
        entry = self._inflight_prefill.pop(request_id, None)
        now = time.monotonic()
        if entry is not None:
            self._view.served(entry[1], now)
            self._meter.first_output(now, n_prompt - n_cached, entry[2])
        self._recent_cached.append((request_id, n_cached))

    def stats(self) -> ReplicaStats:
        """This replica's current self-report."""
        s: EngineStats = self._stats
        return ReplicaStats(
            replica_id=self._replica_id,
            model_id=self._model.id,
            block_size=s.block_size,
            num_gpu_blocks=s.num_gpu_blocks,
            kv_usage=s.kv_usage,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            queued_prefill_tokens=sum(entry[0] for entry in self._inflight_prefill.values()),
            prefill_tokens_per_s=self._meter.rate,
            kv_events_endpoint=self._kv_events_endpoint,
            timestamp=time.time(),
            recent_cached_tokens=tuple(self._recent_cached),
        )

    def record_routing_stats(self) -> dict[str, Any]:
        """Called by Serve every request_routing_stats_period_s; read by the request router."""
        st = self.stats()
        m = metrics()
        tags = {"model": self._model.id, "replica": self._replica_id}
        m.replica_queued_prefill_tokens.set(st.queued_prefill_tokens, tags=tags)
        m.replica_running.set(st.num_running, tags=tags)
        m.replica_loop_lag_ms.set(self._lag.lag_s * 1000, tags=tags)
        m.replica_loop_busy_ratio.set(self._lag.busy, tags=tags)
        return dataclasses.asdict(st)

    async def get_stats(self) -> dict[str, Any]:
        """The same report, on demand (tests, debugging)."""
        return dataclasses.asdict(self.stats())

    async def reset_prefix_cache(self) -> bool:
        """Drop the engine's prefix cache (publishes AllBlocksCleared when KV events are on)."""
        return await self._engine.reset_prefix_cache()

    async def check_health(self) -> None:
        """Serve's health check: raise when the engine is dead, or stalled with requests running."""
        if self._engine.errored:
            raise RuntimeError(f"vLLM engine of replica {self._replica_id} is dead: {self._engine.dead_error}")
        stalled = stalled_for(self._stats.last_step, self._busy_since, self._streams, time.monotonic(),
                              self._model.engine_stall_timeout_s)
        if stalled is not None:
            self._leave(f"the vLLM engine made no step for {stalled:.0f} s")  # do not wait for Serve's graceful stop
            raise RuntimeError(f"vLLM engine of replica {self._replica_id} made no step for {stalled:.0f} s with "
                               f"{self._streams} request(s) running")
        await asyncio.wait_for(self._engine.check_health(), timeout=10)

    def __del__(self) -> None:
        """Serve's graceful stop: shut the engine down; its end is not a death to react to."""
        self._leaving = True  # the watcher stops, and no request path makes the replica exit meanwhile
        watch = getattr(self, "_watch", None)
        if watch is not None:
            watch.cancel()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


def log_like_serve() -> None:
    """Send this project's INFO lines (effective engine args, readiness, startup times) through Serve's handlers
    (the replica's stderr, in Ray's worker log): Serve configures only its own ``ray.serve`` logger, so they
    were otherwise dropped."""
    serve_handlers = logging.getLogger("ray.serve").handlers
    for name in ("deployments", "routers", "serve_app"):
        ours = logging.getLogger(name)
        if not ours.handlers and serve_handlers:
            ours.setLevel(logging.INFO)
            ours.propagate = False
            for handler in serve_handlers:
                ours.addHandler(handler)


def startup_times(init_at: float, engine_steps: dict[str, float]) -> dict[str, float]:
    """Wall-clock times of this replica's start (benchmarks/restart_cpu.py reads them from the replica's log)."""
    import psutil

    return {"process_start": psutil.Process().create_time(), "module_loaded": _MODULE_LOADED, "init": init_at,
            **engine_steps, "ready": time.time()}


def stalled_for(last_step: float, busy_since: float, running: int, now: float, timeout_s: float) -> float | None:
    """Seconds without engine progress, if requests are running and that exceeds ``timeout_s``, else None.

    Progress is the later of the engine's last step and the moment the replica went from idle to busy (an
    engine idle for an hour has an old last step, but is not stalled by that).
    """
    since = max(last_step, busy_since)
    if running <= 0 or now - since < timeout_s:
        return None
    return now - since


def build_replica(model: ModelConfig, app: AppConfig):
    """The Serve application node of one model's replica deployment."""
    from ray import serve

    from deployments.admission import serve_max_queued_requests
    from deployments.request_router import request_router_config

    d = model.deployment
    opts = d.serve_options()
    # The ingress keeps the model's queue bound (deployments.admission); Serve's own is one it cannot reach first.
    opts["max_queued_requests"] = serve_max_queued_requests(d.max_ongoing_requests, d.max_queued_requests,
                                                            d.replica_bounds()[1])
    actor = dict(opts.pop("ray_actor_options", {}))
    seed = app.routing.seed()  # from the config, or checked present in this process's env (hash_seed_from_env)
    # A seed from the environment (a Secret on every pod) stays out of the deployment's visible options.
    env = {**({} if app.routing.hash_seed_from_env else {"PYTHONHASHSEED": seed}), **model.env}
    runtime_env = dict(actor.pop("runtime_env", {}) or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    actor["runtime_env"] = runtime_env
    router_cfg = request_router_config(
        app.routing, model_id=model.id, stats_period_s=model.deployment.request_routing_stats_period_s,
        stats_timeout_s=model.deployment.request_routing_stats_timeout_s)
    bundles, strategy = placement_bundles(model)
    opts["placement_group_bundles"] = bundles
    opts["placement_group_strategy"] = strategy
    # The actor lives in bundle 0: with TP=1 it runs the engine and takes the GPU share itself; with
    # TP>1 vLLM's Ray executor starts one GPU worker per bundle and the actor keeps only its CPUs.
    if model.tensor_parallel_size > 1:
        actor["num_gpus"] = 0
    name = "vllm-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in model.id)
    deployment = serve.deployment(VLLMReplica, name=name).options(
        ray_actor_options=actor, request_router_config=router_cfg, **opts
    )
    logger.info("replica deployment %s: %s", name, {**opts, "ray_actor_options": actor})
    return deployment.bind(model.model_dump(), app.model_dump())
