"""Every error the HTTP app answers, in OpenAI's shape.

Owns: ``install_error_handlers`` (the app's exception handlers). Whatever goes wrong, the client gets
``{"error": {"message", "type", "param", "code"}}`` with the HTTP status:

  - ``APIError`` raised anywhere in the ingress: its own status, body and headers (vLLM's own request
    errors are the ingress's handler: a 400 naming vLLM's ``parameter``);
  - Starlette's own errors: an unknown route (404, ``unknown_url``), a wrong method (405,
    ``method_not_allowed``), a body FastAPI cannot decode (400, ``invalid_body``: e.g. bad UTF-8), a body
    over ``ingress.max_body_bytes`` found while it is read (413, ``request_too_large``,
    ``deployments.limits``), and any other status Starlette raises;
  - a body that fails validation: 400 (as OpenAI and vLLM answer it, not FastAPI's 422), naming the
    first offending field in ``param`` (a body that is not a JSON object, or on which one of vLLM's
    validators crashes, is such an error: ``deployments.openai_api``); a body that is not JSON: 400,
    ``invalid_json``;
  - anything else (a bug): 500, ``server_error``/``internal_error``, with the exception type only (no
    traceback or internal detail reaches the client); the traceback is logged.

Errors that carry a known model are counted in ``model_invocations_total`` (``deployments.rejections``)
unless the request's tracker already counted them.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers above on ``app``."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unhandled)
