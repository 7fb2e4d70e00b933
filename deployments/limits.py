"""What one request may ask of the ingress before any costly work is done for it.

Owns: ``BodyLimitMiddleware`` (a body over ``ingress.max_body_bytes`` is a 413 before it is parsed:
at once when ``Content-Length`` says so, else as soon as the bytes read pass the limit),
``RequestLimits`` (the per-request caps: prompts per request and choices, ``n`` x prompts; and a
prompt too long for the model's context, refused from its length in characters before it is
tokenized), ``prompt_count`` and ``max_chars_per_token``.

Why: JSON decoding and pydantic validation run on the event loop and hold the GIL (a thread does not
help: both are C/Rust code that never releases it), so their cost is bounded by the body size. Measured
on the stub ingress (2 cores): a 5 MB chat body of 150K short messages held the loop ~0.7 s; a 5 MB
completion body of 580K prompts held it 99 s (one replica call per prompt) before the caps; a 5 MB
prompt took 4-6 s of tokenization on the preparation thread before its context-length 400, which the
character bound now answers at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from deployments.openai_api import APIError


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server accepts ({limit} bytes)",
                    code="request_too_large")


class BodyLimitMiddleware:
    """ASGI middleware: 413 in OpenAI's shape for a body over the limit of the replica's ``Ingress``."""

    def __init__(self, app: Any, limit_of: Callable[[], int | None] | None = None) -> None:
        self.app, self._limit_of = app, limit_of or _replica_limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        limit = self._limit_of() if scope["type"] == "http" else None
        if not limit:
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limit:
            err = _too_large(limit)
            await JSONResponse(err.body(), status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # FastAPI re-raises an HTTPException from the body read; the handler shapes it
                    raise HTTPException(413, _too_large(limit).message)
            return message

        await self.app(scope, limited, send)


def _replica_limit() -> int | None:
    """``limits.max_body_bytes`` of the Serve replica's instance (the Ingress), found as Serve finds it."""
    from ray import serve

    limits = getattr(serve.get_replica_context().servable_object, "limits", None)
    return limits.max_body_bytes if limits is not None else None


def max_chars_per_token(tokenizer: Any) -> int | None:
    """The most characters of input one token of ``tokenizer`` can stand for, or None when unknown.

    A vocabulary entry's length bounds what its token covers (byte-level BPE: one character per byte;
    SentencePiece: the piece itself), so a text of C characters has at least C / this many tokens. Only
    for fast tokenizers without a normalizer: a normalizer may delete characters.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return None
    return max((len(t) for t in tokenizer.get_vocab()), default=0) or None


def prompt_count(body: Any) -> int:
    """How many prompts a request body carries: one for a chat, one per entry of a batched ``prompt``."""
    prompt = getattr(body, "prompt", None)
    if getattr(body, "messages", None) is not None or prompt is None or isinstance(prompt, str):
        return 1
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


@dataclass(frozen=True)
class RequestLimits:
    """The ingress's per-request caps (``ingress:`` in the app config) and each model's character bound."""

    max_body_bytes: int | None
    max_prompts_per_request: int
    max_choices_per_request: int
    context: Mapping[str, tuple[int, int]]  # model id -> (max_model_len, characters surely beyond it)

    @classmethod
    def build(cls, ingress: Any, models: Mapping[str, tuple[Any, int]]) -> RequestLimits:
        """From ``IngressConfig`` and {model id: (tokenizer, max_model_len)}."""
        chars = {}
        for model_id, (tokenizer, max_model_len) in models.items():
            per_token = max_chars_per_token(tokenizer)
            if per_token:
                chars[model_id] = (max_model_len, per_token * max_model_len)
        return cls(ingress.max_body_bytes, ingress.max_prompts_per_request, ingress.max_choices_per_request, chars)

    def check(self, model_id: str, body: Any, chars: int) -> None:
        """Raise a 400 for a request over a cap, or whose ``chars`` of prompt text cannot fit the context."""
        prompts = prompt_count(body)
        if prompts > self.max_prompts_per_request:
            raise APIError(400, f"a request may carry at most {self.max_prompts_per_request} prompts; this one has "
                           f"{prompts}", param="prompt", code="too_many_prompts", model=model_id)
        n = getattr(body, "n", None) or 1
        if n * prompts > self.max_choices_per_request:
            raise APIError(400, f"n x prompts may be at most {self.max_choices_per_request}; this request asks for "
                           f"{n} x {prompts}", param="n", code="too_many_choices", model=model_id)
        max_len, bound = self.context.get(model_id, (0, 0))
        if bound and chars > bound * prompts:  # then at least one prompt exceeds the context
            raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, the prompt "
                           f"is {chars} characters (or token ids) long, more than that many tokens can hold. Please "
                           "reduce the length of the messages or prompt.",
                           param="messages" if hasattr(body, "messages") else "prompt",
                           code="context_length_exceeded", model=model_id)
