"""The OpenAI-compatible ingress deployment.

Owns: the FastAPI routes (``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/health``), tokenization and block hashing (the chat template is rendered, the prompt tokenized and
its KV block hashes computed once, here; the replica receives token ids and the router the hashes),
request validation and the context-length check, and ``build_ingress``. A model's state and a request's
metrics are ``deployments.served_model``. Errors in
OpenAI's shape are ``deployments.http_errors``; the body limit and per-request caps ``deployments.limits``; the
bound on generation requests in flight (a fast 503 beyond the models' queues) ``deployments.admission``.
Per-stage timing and tracing live in ``deployments.stages``.

Prompt preparation (render + tokenize + hash) runs on the event loop for short prompts and on the
model's one preparation thread for long ones (``_INLINE_CHARS``): a long prompt must not stall every
other request's streaming, and a short one is cheaper than a thread hop. One thread per model keeps
the tokenizer and the hash memo single-threaded.

The call to a replica goes through the model's deployment handle, whose request router (configured on
the replica deployment, see ``deployments.request_router``) picks the replica; retries, cancellation
and the mapping of replica failures to errors are ``deployments.dispatch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from deployments.admission import Admission, AdmissionMiddleware
from deployments.auth import AuthMiddleware, Gate, tenant_of
from deployments.choices import OutputSpec
from deployments.dispatch import dispatch
from deployments.generation import Accumulator, merge, primed, sse_events, within
from deployments.heap import freeze_startup_heap
from deployments.http_errors import install_error_handlers
from deployments.limits import BodyLimitMiddleware, RequestLimits
from deployments.metrics import metrics
from deployments.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeRequest,
)
from deployments.pacing import LoopLag
from deployments.protocol import GenerateChunk, GenerateRequest
from deployments.readiness import Readiness, serve_status_source
from deployments.rejections import record_rejection
from deployments.rendering import Frontend
from deployments.served_model import RequestTracker, ServedModel
from deployments.stages import AcceptedAtMiddleware, RequestStages, Tracer, accepted_at
from routers.hashing import BlockHasher
from serve_app.config import AppConfig
from serve_app.settings import INGRESS_LOOP_ENV

logger = logging.getLogger(__name__)


app = FastAPI(title="kvserve", docs_url=None, redoc_url=None)
app.add_middleware(BodyLimitMiddleware)  # 413 (deployments.limits): uses the replica's Ingress.limits
app.add_middleware(AdmissionMiddleware)  # fast 503 beyond the queues (deployments.admission): Ingress.admission
app.add_middleware(AuthMiddleware)  # API keys (deployments.auth): uses the replica's Ingress.gate
app.add_middleware(AcceptedAtMiddleware)  # added last: outermost, so it stamps before auth runs
install_error_handlers(app)  # every error in OpenAI's shape (deployments.http_errors)
_INLINE_CHARS = 8192  # prompts up to this many characters (~2K tokens, ~1 ms) are prepared on the event loop


def _vllm_client_error() -> type[BaseException]:
    """vLLM's base class of request errors (VLLMClientError; in vLLM 0.26 its validation errors are ValueErrors)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        from vllm.exceptions import VLLMValidationError as VLLMClientError
    return VLLMClientError


@app.exception_handler(_vllm_client_error())
async def _vllm_request_error(request: Request, err: Exception) -> JSONResponse:
    """A vLLM request model refused the body from a validator (vLLM's errors are not pydantic's): a 400."""
    record_rejection(400, None, getattr(request.app.state, "model_ids", ()))
    param = getattr(err, "parameter", None)
    return JSONResponse(APIError(400, str(err.args[0]) if err.args else str(err), param=param).body(), status_code=400)


@serve.ingress(app)
class Ingress:
    """Validates, tokenizes, dispatches to the model's replicas and streams the answer back."""

    def __init__(self, app_config: dict[str, Any], handles: dict[str, Any]) -> None:
        self._cfg = AppConfig.model_validate(app_config)
        self._session_header = self._cfg.routing.session_header
        self._models: dict[str, ServedModel] = {}
        routing = self._cfg.routing
        hashed = routing.strategy in ("prefix-aware", "kv-aware") and routing.request_router_class is None
        for m in self._cfg.models:
            frontend = Frontend(m)
            handle = handles[m.id].options(stream=True)
            hasher = BlockHasher(algo=routing.hash_algo, seed=routing.hash_seed) if hashed else None
            prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"prepare-{m.id}")
            self._models[m.id] = ServedModel(m, frontend, handle, hasher, prep)
        tracing = self._cfg.tracing
        self._tracer = (Tracer(tracing.otlp_traces_endpoint, tracing.service_name)
                        if tracing.otlp_traces_endpoint else None)
        self._created = int(time.time())
        app.state.model_ids = frozenset(self._models)
        replica = serve.get_replica_context()
        self._readiness = Readiness({i: handles[i].deployment_name for i in self._models},
                                    serve_status_source(replica.app_name))
        self._readiness.start()
        # Read by AuthMiddleware; limits are divided among the running ingress replicas (deployments.rate_limits).
        self.gate = Gate.from_app(self._cfg, share_of=lambda: self._readiness.running(replica.deployment))
        self.admission = Admission.from_app(  # read by AdmissionMiddleware
            self._cfg, {i: handles[i].deployment_name for i in self._models}, self._readiness.running,
            replica.deployment)
        self.limits = RequestLimits.build(  # read by BodyLimitMiddleware
            self._cfg.ingress, {i: (m.frontend.tokenizer, m.max_model_len) for i, m in self._models.items()})
        # How late this replica's one event loop runs (requests, streams, routing and KV events share it): a gauge,
        # and while it is behind, the requests dispatched ask their replicas to merge chunks. Serve runs the
        # constructor on that loop; a constructor called outside one (unit tests) has no probe and never asks.
        ing = self._cfg.ingress
        self._lag = LoopLag(ing.stream_merge_lag_ms / 1000, period_s=0.05, busy_threshold=ing.stream_merge_busy)
        self._lag_probe = None
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            lag_tags = {"replica": replica.replica_id.unique_id}
            self._lag_probe = loop.create_task(
                self._lag.run(lambda probe: self._report_loop(probe, lag_tags)))
        logger.info("ingress up for models %s", list(self._models))
        freeze_startup_heap("ingress")

    @staticmethod
    def _report_loop(probe: LoopLag, tags: dict[str, str]) -> None:
        m = metrics()
        m.ingress_loop_lag_ms.set(probe.lag_s * 1000, tags=tags)
        m.ingress_loop_busy_ratio.set(probe.busy, tags=tags)

    def inflight(self) -> int:
        """Generation requests this replica holds now (a handle call, not a route: benchmarks check it drains)."""
        return self.admission.inflight

    # --- routes -------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> JSONResponse:
        status, body = self._readiness.health()
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return self._readiness.models_body(lambda i: {
            "id": i, "object": "model", "created": self._created, "owned_by": "kvserve",
            "max_model_len": self._models[i].max_model_len})

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        m = self._model(body.model)
        fe = m.frontend
        rendered: list[Any] = []

        def prepare() -> list[list[int]]:
            r = fe.render_chat(body)
            rendered.append(r)
            return [r.token_ids]

        def spec(prompts: list[list[int]]) -> OutputSpec:
            return fe.chat_output(body, rendered[0], prompts)

        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await self._serve(m, body, prepare, spec, fe.chat_size(body), requested, chat=True,
                                 request=request)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        m = self._model(body.model)
        fe = m.frontend
        raw = fe.prompts(body)
        size = sum(len(p) for p in raw)

        def spec(prompts: list[list[int]]) -> OutputSpec:
            return fe.completion_output(body, raw, prompts)

        return await self._serve(m, body, lambda: fe.render_prompts(body), spec, size, body.max_tokens, chat=False,
                                 request=request)

    @app.post("/tokenize")
    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        """vLLM's /tokenize: a prompt or a chat (rendered with the model's template) to token ids."""
        m = self._model(body.model)
        fe = m.frontend

        def run() -> list[int]:
            if isinstance(body, TokenizeChatRequest):
                return fe.render_chat(body).token_ids
            return fe.render_prompts(body)[0]

        size = len(body.prompt) if hasattr(body, "prompt") else fe.chat_size(body)
        ids = run() if size <= _INLINE_CHARS else await asyncio.get_running_loop().run_in_executor(m.prep, run)
        strs = fe.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": m.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        """vLLM's /detokenize: token ids to text."""
        m = self._model(body.model)
        fe = m.frontend
        if any(t >= fe.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {fe.vocab_size})", param="tokens", model=m.config.id)
        return {"prompt": fe.tokenizer.decode(body.tokens)}

    # --- request path -------------------------------------------------------------------------
    def _model(self, model_id: str | None) -> ServedModel:
        if model_id is None:  # vLLM's request models make `model` optional: the first served model
            model_id = next(iter(self._models))
        m = self._models.get(model_id)
        if m is None:
            raise APIError(404, f"The model `{model_id}` does not exist. Available: {sorted(self._models)}",
                           param="model", code="model_not_found")
        self._readiness.check(model_id)
        return m

    def _requests(self, m: ServedModel, body, prompts: list[tuple[list[int], tuple[int, ...]]], requested: int | None,
                  request: Request, stages: RequestStages, tenant: Any, salt: str | None,
                  reasoning_ended: bool | None) -> list[GenerateRequest]:
        reqs = []
        session = request.headers.get(self._session_header) if self._session_header else None
        trace_headers = stages.trace_headers()
        fe = m.frontend
        for ids, hashes in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            budget = m.max_model_len - len(ids)
            max_tokens = requested if requested is not None else fe.default_max_tokens(budget)
            if budget <= 0 or max_tokens > budget:
                raise APIError(
                    400, f"This model's maximum context length is {m.max_model_len} tokens. However, you "
                    f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the "
                    "completion). Please reduce the length of the messages or completion.",
                    param="max_tokens", code="context_length_exceeded")
            reqs.append(GenerateRequest(
                request_id=uuid.uuid4().hex, model_id=m.config.id, prompt_token_ids=ids,
                sampling=fe.sampling(body, max_tokens), block_hashes=hashes, session_key=session,
                cache_salt=salt, arrival_time=time.time(), trace_headers=trace_headers,
                reasoning_ended=reasoning_ended, merge_chunks=self._lag.behind or not body.stream))
        self.gate.admit_tokens(tenant, sum(len(ids) for ids, _ in prompts), time.monotonic())
        return reqs

    async def _chunks(self, m: ServedModel, req: GenerateRequest, stages: RequestStages,
                      stream: bool = True) -> AsyncIterator[GenerateChunk]:
        def on_first(sent: GenerateRequest, first: GenerateChunk) -> None:
            stages.on_chunk(first.timing, first.replica_id)
            if first.timing is not None and first.timing.block_size != m.block_size:
                m.block_size = first.timing.block_size  # later prompts are hashed here, not in the router

        req.dispatched_at = time.time()
        with self.admission.hold(m.handle.deployment_name, m.config.id):  # the model's queue bound: a fast 503
            async for chunk in dispatch(m.handle, req, m.config.id, buffer=not stream, on_first=on_first):
                yield chunk

    async def _serve(self, m: ServedModel, body, prepare: Callable[[], list[list[int]]],
                     spec: Callable[[list[list[int]]], OutputSpec], size: int, requested: int | None, chat: bool,
                     request: Request):
        start = accepted_at(request)
        stages = RequestStages(m.config.id, start, self._tracer)
        track = RequestTracker(m, start, stages)
        tenant = tenant_of(request)
        salt = self.gate.cache_salt(tenant, body.cache_salt)  # the tenant's, not the client's
        track.on_done = lambda a: self.gate.settle(tenant, a.completion_tokens, time.monotonic())
        acc = Accumulator(chat=chat, rid="", created=int(time.time()), model=m.config.id,
                          show_cached=self._cfg.ingress.expose_cached_tokens)

        def prepare_and_hash() -> list[tuple[list[int], tuple[int, ...]]]:
            prompts = prepare()
            stages.tokenized = time.perf_counter()
            hashed = [(ids, m.hashes(ids, salt)) for ids in prompts]
            stages.hashed = time.perf_counter()
            return hashed

        try:
            self.limits.check(m.config.id, body, size)  # caps and a sure context overflow, before tokenizing
            if size <= _INLINE_CHARS:
                prompts = prepare_and_hash()
            else:
                prompts = await asyncio.get_running_loop().run_in_executor(m.prep, prepare_and_hash)
            acc.spec = spec([ids for ids, _ in prompts])
            parser = acc.spec.parser() if acc.spec.parser is not None else None
            ended = m.frontend.reasoning_ended(parser, prompts[0][0], body) if chat else None
            reqs = self._requests(m, body, prompts, requested, request, stages, tenant, salt, ended)
        except APIError as err:
            track.error(err)
            track.done(acc)
            raise
        acc.rid = ("chatcmpl-" if chat else "cmpl-") + reqs[0].request_id
        n_choices = (body.n or 1) * len(reqs)
        stages.mark_dispatched()
        chunks = within(merge([self._chunks(m, r, stages, body.stream) for r in reqs], body.n or 1),
                        self._cfg.ingress.request_timeout_s)
        if body.stream:
            try:  # refused before its first output: the status says so (after it, an error event does)
                first, chunks = await primed(chunks)
            except APIError as err:
                track.error(err)
                track.done(acc)
                raise
            except Exception:  # a bug: the catch-all handler answers a shaped 500
                track.error(APIError(500, "internal error", type_="server_error"))
                track.done(acc)
                raise
            except BaseException:  # the client went away
                track.cancelled()
                track.done(acc)
                raise
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = sse_events(acc, chunks, n_choices, include_usage, track.first, track.error)
            return StreamingResponse(track.wrap(events, acc), media_type="text/event-stream",
                                     headers=self._headers(stages, first[1].replica_id if first else None))
        try:
            async for offset, chunk in chunks:
                track.first()
                acc.add(offset, chunk)
        except APIError as err:
            track.error(err)
            raise
        except BaseException:
            track.cancelled()
            raise
        finally:
            track.done(acc)
        return JSONResponse(acc.response(n_choices), headers=self._headers(stages, acc.replica_id))

    def _headers(self, stages: RequestStages, replica_id: str | None) -> dict[str, str] | None:
        """The response's optional headers: Server-Timing (``ingress.server_timing_header``) and the replica that
        served it (``ingress.expose_replica_header``; a stream names the replica of its first chunk)."""
        headers = {}
        if self._cfg.ingress.server_timing_header:
            headers["server-timing"] = stages.server_timing()
        if replica_id and self._cfg.ingress.expose_replica_header:
            headers["x-kvserve-replica"] = replica_id
        return headers or None


def build_ingress(cfg: AppConfig, replicas: dict[str, Any]):
    """The Serve application node of the ingress, bound to each model's replica deployment.

    Its replicas run requests, app and routing on Serve's one event loop (``settings.INGRESS_LOOP_ENV``), so a
    request beyond the admission bound is refused in the task that received it.
    """
    opts = cfg.ingress.deployment.serve_options()
    actor = dict(opts.pop("ray_actor_options", {}))
    runtime_env = dict(actor.pop("runtime_env", {}) or {})
    runtime_env["env_vars"] = {**INGRESS_LOOP_ENV, **runtime_env.get("env_vars", {})}
    opts["ray_actor_options"] = {**actor, "runtime_env": runtime_env}
    logger.info("ingress deployment: %s", opts)
    return serve.deployment(Ingress, name="ingress").options(**opts).bind(cfg.model_dump(), replicas)
