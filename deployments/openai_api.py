"""OpenAI wire format: the request models, the error shape, and the envelope builders of responses.

Owns: ``APIError`` (raised anywhere in the ingress, rendered as ``{"error": {"message", "type", "param",
"code"}}`` with its HTTP status), the usage object and the SSE/chunk envelopes. The request models are
vLLM's own (``ChatCompletionRequest``, ``CompletionRequest``, ``TokenizeRequest``, ``DetokenizeRequest``),
re-exported from here so that one module holds their import paths: the ingress validates with exactly
what ``vllm serve`` validates with. What goes inside ``choices[]`` is ``deployments.choices``.
"""

from __future__ import annotations

import json
from typing import Any


class APIError(Exception):
    """An error that reaches the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None,
                 model: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers  # e.g. Retry-After on 429/503, WWW-Authenticate on 401
        self.model = model  # the (known) model the request named, for the metrics' model label
        self.counted = False  # set once the request's metrics recorded this error

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


#: vLLM's own request models (validation, defaults, ``to_sampling_params``), by the module that holds each: the
#: same paths in vLLM 0.26 and 0.27. Imported on first use (module ``__getattr__``), so that importing
#: ``APIError`` does not import vLLM.
_VLLM_MODELS = {
    "ChatCompletionRequest": "vllm.entrypoints.openai.chat_completion.protocol",
    "CompletionRequest": "vllm.entrypoints.openai.completion.protocol",
    "TokenizeChatRequest": "vllm.entrypoints.serve.tokenize.protocol",
    "TokenizeCompletionRequest": "vllm.entrypoints.serve.tokenize.protocol",
    "DetokenizeRequest": "vllm.entrypoints.serve.tokenize.protocol",
}
_models: dict[str, Any] = {}


def _object_body(cls: type) -> type:
    """vLLM's request model ``cls``, whose validators' crashes on malformed bodies become validation errors.

    vLLM's "before" validators read the raw body as they expect it (``data.get``, ``list(msg["tool_calls"])``):
    a JSON array, a scalar or a mistyped field raises AttributeError or TypeError there, a 500. This wrap
    validator runs around the inherited ones and turns those into a 400 (a pydantic validation error).
    """
    from pydantic import model_validator

    def _guarded(_, data: Any, handler: Any) -> Any:
        if not isinstance(data, dict):
            # pydantic turns a ValueError raised in a validator into a validation error (a 400), not a TypeError
            raise ValueError("the request body must be a JSON object")  # noqa: TRY004
        try:
            return handler(data)
        except (AttributeError, TypeError, KeyError) as err:
            raise ValueError(f"malformed request: {err}") from None

    ns = {"__module__": __name__, "__doc__": cls.__doc__,
          "_guarded": model_validator(mode="wrap")(classmethod(_guarded))}
    return type(cls.__name__, (cls,), ns)


def __getattr__(name: str) -> Any:
    if name == "TokenizeRequest":  # vLLM's union of the two /tokenize bodies
        return __getattr__("TokenizeCompletionRequest") | __getattr__("TokenizeChatRequest")
    if name in _VLLM_MODELS:
        if name not in _models:
            import importlib

            _models[name] = _object_body(getattr(importlib.import_module(_VLLM_MODELS[name]), name))
        return _models[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# the request models are resolved on first use by the module __getattr__ above (F822 cannot see them)
__all__ = ["SSE_DONE", "APIError", "ChatCompletionRequest", "CompletionRequest", "DetokenizeRequest",  # noqa: F822
           "TokenizeChatRequest", "TokenizeCompletionRequest", "TokenizeRequest", "chunk", "sse", "usage"]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> dict[str, Any]:
    """OpenAI's usage object; ``prompt_tokens_details`` only when cached tokens are reported."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


SSE_DONE = "data: [DONE]\n\n"


def chunk(rid: str, created: int, model: str, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
    """One streamed chunk carrying one ``choices[]`` entry (``obj``: chat.completion.chunk or text_completion)."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, created: int, model: str, obj: str, u: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": u}
