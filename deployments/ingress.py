"""The OpenAI-compatible ingress deployment.

Owns: the FastAPI routes (``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/health``), tokenization (the chat template is rendered and the prompt tokenized once, here; the
replica receives token ids), request validation and the context-length check, error mapping to
OpenAI's shape, request metrics, and ``build_ingress``.

The call to a replica goes through the model's deployment handle, whose request router (configured on
the replica deployment, see ``deployments.request_router``) picks the replica; retries, cancellation
and the mapping of replica failures to errors are ``deployments.dispatch``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.auth import AuthMiddleware, Gate, tenant_of
from deployments.dispatch import dispatch
from deployments.generation import Accumulator, merge, sse_events, within
from deployments.metrics import metrics
from deployments.openai_api import APIError, ChatCompletionRequest, CompletionRequest
from deployments.protocol import GenerateChunk, GenerateRequest
from deployments.request_router import record_actual_cached_tokens
from serve_app.config import AppConfig, ModelConfig

logger = logging.getLogger(__name__)


def _own_serve_request_id() -> None:
    """Give the calls made from the current asyncio task their own Serve internal request id.

    Serve copies the HTTP request's internal id into every handle call made while serving it, and its
    request router indexes pending requests by that id (a second pending request with the same id is
    taken for a retry and never indexed). The prompts of one batched completion are dispatched
    concurrently, so without distinct ids all but one could wait forever for a replica. Each prompt's
    task sets its own id here; the context variable is task-local, so the HTTP request keeps its own.
    """
    from ray.serve import context as serve_context

    current = serve_context._get_serve_request_context()
    serve_context._serve_request_context.set(
        dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex))


app = FastAPI(title="kvserve", docs_url=None, redoc_url=None)
app.add_middleware(AuthMiddleware)  # API keys (deployments.auth): uses the replica's Ingress.gate


@app.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (unparsable body, unknown path, wrong method) in OpenAI's shape."""
    return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code,
                        headers=getattr(err, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    msg = first.get("msg", "invalid request")
    message = f"{'.'.join(loc)}: {msg}" if loc else msg
    return JSONResponse(APIError(400, message, param=".".join(loc) or None).body(), status_code=400)


@dataclass
class _Model:
    config: ModelConfig
    tokenizer: Any
    max_model_len: int
    handle: Any
    inflight: int = 0


def _max_model_len(model: ModelConfig) -> int:
    if model.max_model_len is not None:
        return model.max_model_len
    cfg = json.loads((model.resolved_path() / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or cfg.get("max_sequence_length") or 2048)


class _Tracker:
    """Request metrics: concurrency, TTFB, latency, tokens, outcome."""

    def __init__(self, m: _Model, start: float) -> None:
        self._m, self._start, self._status, self._first = m, start, "success", False
        self.on_done: Any = None  # called with the Accumulator when the request ends (token limits)
        m.inflight += 1
        metrics().concurrent.set(m.inflight, tags={"model": m.config.id})

    def first(self) -> None:
        if not self._first:
            self._first = True
            ms = (time.perf_counter() - self._start) * 1000
            metrics().ttfb_ms.observe(ms, tags={"model": self._m.config.id, "status": "success"})

    def error(self, err: APIError) -> None:
        self._status = "client_error" if err.status < 500 else "server_error"

    def cancelled(self) -> None:
        self._status = "cancelled"

    async def wrap(self, events: AsyncIterator[str], acc: Accumulator) -> AsyncIterator[str]:
        try:
            async for e in events:
                yield e
        except BaseException:
            self.cancelled()
            raise
        finally:
            self.done(acc)

    def done(self, acc: Accumulator) -> None:
        m, model = metrics(), self._m.config.id
        self._m.inflight -= 1
        m.concurrent.set(self._m.inflight, tags={"model": model})
        tags = {"model": model, "status": self._status}
        m.invocations.inc(1, tags=tags)
        m.latency_ms.observe((time.perf_counter() - self._start) * 1000, tags=tags)
        for counter, value in ((m.prompt_tokens, acc.prompt_tokens), (m.cached_tokens, acc.cached_tokens),
                               (m.completion_tokens, acc.completion_tokens)):
            if value > 0:  # ray.util.metrics rejects inc(0)
                counter.inc(value, tags={"model": model})
        if self.on_done is not None:
            self.on_done(acc)


def _record_cached(req: GenerateRequest, first: GenerateChunk) -> None:
    record_actual_cached_tokens(req.request_id, first.cached_tokens or 0)


@serve.ingress(app)
class Ingress:
    """Validates, tokenizes, dispatches to the model's replicas and streams the answer back."""

    def __init__(self, app_config: dict[str, Any], handles: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        self._cfg = AppConfig.model_validate(app_config)
        self._session_header = self._cfg.routing.session_header
        self._models: dict[str, _Model] = {}
        for m in self._cfg.models:
            tok = AutoTokenizer.from_pretrained(str(m.resolved_tokenizer()))
            handle = handles[m.id].options(stream=True)
            self._models[m.id] = _Model(m, tok, _max_model_len(m), handle)
        self._created = int(time.time())
        self.gate = Gate.from_app(self._cfg)  # read by AuthMiddleware
        logger.info("ingress ready for models %s", list(self._models))

    # --- routes -------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        data = [{"id": m.config.id, "object": "model", "created": self._created, "owned_by": "kvserve",
                 "max_model_len": m.max_model_len} for m in self._models.values()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        m = self._model(body.model)
        try:
            messages = [{"role": msg.role, "content": msg.text()} for msg in body.messages]
            text = m.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        except Exception as err:  # noqa: BLE001 - template errors are the client's input
            raise APIError(400, f"cannot render the chat template: {err}", param="messages") from None
        ids = m.tokenizer.encode(text, add_special_tokens=False)
        return await self._serve(m, body, [ids], chat=True, request=request)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        m = self._model(body.model)
        prompts = []
        for p in body.prompts():
            if isinstance(p, str):
                prompts.append(m.tokenizer.encode(p, add_special_tokens=True))
            else:
                vocab = len(m.tokenizer)
                if any(t < 0 or t >= vocab for t in p):
                    raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
                prompts.append(list(p))
        return await self._serve(m, body, prompts, chat=False, request=request)

    # --- request path -------------------------------------------------------------------------
    def _model(self, model_id: str) -> _Model:
        m = self._models.get(model_id)
        if m is None:
            raise APIError(404, f"The model `{model_id}` does not exist. Available: {sorted(self._models)}",
                           param="model", code="model_not_found")
        return m

    def _requests(self, m: _Model, body, prompts: list[list[int]], request: Request) -> list[GenerateRequest]:
        reqs = []
        session = request.headers.get(self._session_header) if self._session_header else None
        tenant = tenant_of(request)
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            budget = m.max_model_len - len(ids)
            max_tokens = body.max_tokens if body.max_tokens is not None else budget
            if budget <= 0 or max_tokens > budget:
                raise APIError(
                    400, f"This model's maximum context length is {m.max_model_len} tokens. However, you "
                    f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the "
                    "completion). Please reduce the length of the messages or completion.",
                    param="max_tokens", code="context_length_exceeded")
            reqs.append(GenerateRequest(
                request_id=uuid.uuid4().hex, model_id=m.config.id, prompt_token_ids=ids,
                sampling=body.sampling(max_tokens), session_key=session,
                cache_salt=self.gate.cache_salt(tenant, body.cache_salt), arrival_time=time.time()))
        self.gate.admit_tokens(tenant, sum(len(ids) for ids in prompts), time.monotonic())
        return reqs

    async def _chunks(self, m: _Model, req: GenerateRequest, own_id: bool, stream: bool = True
                      ) -> AsyncIterator[GenerateChunk]:
        if own_id:  # one prompt of a batch, iterated in its own task (generation.merge)
            _own_serve_request_id()
        async for chunk in dispatch(m.handle, req, m.config.id, buffer=not stream, on_first=_record_cached):
            yield chunk

    async def _serve(self, m: _Model, body, prompts: list[list[int]], chat: bool, request: Request):
        start = time.perf_counter()
        track = _Tracker(m, start)
        tenant = tenant_of(request)
        track.on_done = lambda a: self.gate.settle(tenant, a.completion_tokens, time.monotonic())
        acc = Accumulator(chat=chat, rid="", created=int(time.time()), model=m.config.id,
                          show_cached=self._cfg.ingress.expose_cached_tokens)
        try:
            reqs = self._requests(m, body, prompts, request)
        except APIError as err:
            track.error(err)
            track.done(acc)
            raise
        acc.rid = ("chatcmpl-" if chat else "cmpl-") + reqs[0].request_id
        n_choices = body.n * len(reqs)
        chunks = within(merge([self._chunks(m, r, own_id=len(reqs) > 1, stream=body.stream) for r in reqs], body.n),
                        self._cfg.ingress.request_timeout_s)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = sse_events(acc, chunks, n_choices, include_usage, track.first, track.error)
            return StreamingResponse(track.wrap(events, acc), media_type="text/event-stream")
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
        show = acc.replica_id and self._cfg.ingress.expose_replica_header
        headers = {"x-kvserve-replica": acc.replica_id} if show else None
        return JSONResponse(acc.response(n_choices), headers=headers)


def build_ingress(cfg: AppConfig, replicas: dict[str, Any]):
    """The Serve application node of the ingress, bound to each model's replica deployment."""
    opts = cfg.ingress.deployment.serve_options()
    logger.info("ingress deployment: %s", opts)
    return serve.deployment(Ingress, name="ingress").options(**opts).bind(cfg.model_dump(), replicas)
