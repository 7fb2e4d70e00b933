"""Every error the HTTP app answers, in OpenAI's shape.

Owns: ``install_error_handlers`` (the app's exception handlers) and ``OpenAIRoute`` (the app's route
class: a body is read as JSON whatever its Content-Type, must be an object, and is validated once by
the route's request model, where a validator that crashes on odd input is a 400, not a 500: vLLM's
request models' validators assume well-formed input). Whatever goes wrong, the client gets
``{"error": {"message", "type", "param", "code"}}`` with the HTTP status:

  - ``APIError`` raised anywhere in the ingress: its own status, body and headers (vLLM's own request
    errors are the ingress's handler: a 400 naming vLLM's ``parameter``);
  - a JSON body that is not an object, or on which a request model's validator crashes: 400,
    ``invalid_body`` (``OpenAIRoute``);
  - Starlette's own errors: an unknown route (404, ``unknown_url``), a wrong method (405,
    ``method_not_allowed``), a body FastAPI cannot decode (400, ``invalid_body``: e.g. bad UTF-8), a body
    over ``ingress.max_body_bytes`` found while it is read (413, ``request_too_large``,
    ``deployments.limits``), and any other status Starlette raises;
  - a body that fails validation: 400 (as OpenAI and vLLM answer it, not FastAPI's 422), naming the
    first offending field in ``param``; a body that is not JSON: 400, ``invalid_json``;
  - anything else (a bug): 500, ``server_error``/``internal_error``, with the exception type only (no
    traceback or internal detail reaches the client); the traceback is logged.

Errors that carry a known model are counted in ``model_invocations_total`` (``deployments.rejections``)
unless the request's tracker already counted them.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.openai_api import APIError
from deployments.rejections import record_rejection

logger = logging.getLogger(__name__)

#: Codes of the statuses Starlette raises itself.
_CODES = {400: "invalid_body", 404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _known(request: Request) -> Any:
    return getattr(request.app.state, "model_ids", ())


def _reply(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _api_error(request: Request, err: APIError) -> JSONResponse:
    if not err.counted:
        record_rejection(err.status, err.model, _known(request))
    return _reply(err)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    status = err.status_code
    if status == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(err.detail or "") or _phrase(status)
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    return _reply(APIError(status, message, type_=type_, code=_CODES.get(status),
                           headers=getattr(err, "headers", None)))


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    errors = err.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "JSON decode error")
        pos = first.get("loc", ("body", None))[-1]
        api_err = APIError(400, f"the body is not valid JSON: {detail} (at character {pos})", code="invalid_json")
    else:
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        msg = first.get("msg", "invalid request")
        message = f"{'.'.join(loc)}: {msg}" if loc else msg
        api_err = APIError(400, message, param=".".join(loc) or None)
    model = err.body.get("model") if isinstance(err.body, dict) else None
    record_rejection(400, model, _known(request))
    return _reply(api_err)


async def _unhandled(request: Request, err: Exception) -> JSONResponse:
    """The last resort (Starlette's ServerErrorMiddleware): a bug, answered in OpenAI's shape."""
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=err)
    record_rejection(500, None, _known(request))
    return _reply(APIError(500, f"internal server error ({type(err).__name__})", type_="server_error",
                           code="internal_error"))


class _BodyRequest(Request):
    """A request whose JSON body is an object, validated once here by the route's body model.

    What the model accepts is returned as the model instance (FastAPI then takes it as is, without validating
    again); what it refuses with pydantic's or vLLM's errors is returned as decoded, for FastAPI to refuse the
    same way (its 400 names the field); anything else a validator raises on client input (vLLM's validators
    raise TypeError on a non-list ``messages``, ...) is a 400 here, never a 500.
    """

    adapter: TypeAdapter | None = None
    refusals: tuple[type[BaseException], ...] = (ValidationError,)

    async def json(self) -> Any:
        value = await super().json()
        if not isinstance(value, dict):  # FastAPI re-raises an HTTPException raised while the body is read
            raise HTTPException(400, f"the request body must be a JSON object, not {type(value).__name__}")
        if self.adapter is None:
            return value
        try:
            return self.adapter.validate_python(value)
        except self.refusals:
            return value
        except Exception as err:  # noqa: BLE001 - a validator that failed on what the client sent
            raise HTTPException(400, f"invalid request body ({type(err).__name__}: {err})") from None


def _refusals() -> tuple[type[BaseException], ...]:
    """pydantic's ValidationError and vLLM's own request errors (VLLMClientError; VLLMValidationError in 0.26)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        try:
            from vllm.exceptions import VLLMValidationError as VLLMClientError
        except ImportError:
            return (ValidationError,)
    return ValidationError, VLLMClientError


class OpenAIRoute(APIRoute):
    """FastAPI's route over a ``_BodyRequest`` (FastAPI's custom route class hook)."""

    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()
        adapter = TypeAdapter(self.body_field.field_info.annotation) if self.body_field is not None else None
        refusals = _refusals() if adapter is not None else ()

        async def route_handler(request: Request) -> Any:
            scope = request.scope
            if adapter is not None:  # the body is JSON whatever the Content-Type (curl -d sends a form's)
                headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
            body_request = _BodyRequest(scope, request.receive)
            body_request.adapter, body_request.refusals = adapter, refusals
            return await handler(body_request)

        return route_handler


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers above on ``app``."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unhandled)
