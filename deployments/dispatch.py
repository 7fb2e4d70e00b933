"""One prompt's call to a model's replicas: retries while nothing reached the client, and explicit cancellation.

Owns: ``dispatch`` (the chunks of one ``GenerateRequest`` from the model's deployment handle) and the mapping
of replica-side failures to OpenAI errors. Rules:
  - a replica that dies (actor died or unreachable) or whose engine died (``ReplicaUnavailableError``) before
    anything was sent to the client is retried on another replica, after a short backoff, up to ``retries``
    times. A non-streaming request has sent nothing until it completes, so its chunks are held back per
    attempt and a failure at any point is retried from scratch;
  - a failure after chunks were sent becomes a 503 ``replica_failed`` (a stream turns it into an error
    event and ``[DONE]``, see ``generation.sse_events``);
  - backpressure is a fast 503 with Retry-After, never retried (a retry would only add load); parameters
    the engine refuses are a 400; any other replica error is a 500;
  - the replica call is cancelled explicitly whenever the caller stops before the call ended (deadline,
    client gone, failure elsewhere in a batch), so the engine aborts the request at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from deployments.openai_api import APIError
from deployments.protocol import GenerateChunk, GenerateRequest, InvalidRequestError, ReplicaUnavailableError

logger = logging.getLogger(__name__)

RETRIES = 3  # extra attempts on another replica while nothing was sent to the client
BACKOFF_S = (0.1, 0.4, 1.0)  # before each retry: Serve learns of a dead replica within about a second


def _dead_replica_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError


def _message(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err  # RayTaskError carries the replica's exception as .cause
    return str(cause.args[0]) if cause.args else type(cause).__name__


async def dispatch(handle: Any, req: GenerateRequest, model_id: str, *, buffer: bool,
                   on_first: Callable[[GenerateRequest, GenerateChunk], None] | None = None,
                   retries: int = RETRIES) -> AsyncIterator[GenerateChunk]:
    """Yield the chunks of ``req``; ``buffer``: hold each attempt's chunks until it completes (non-streaming)."""
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    dead = _dead_replica_errors()
    for attempt in range(retries + 1):
        call = handle.generate.remote(req)
        done, sent, held = False, False, []
        try:
            first = True
            async for chunk in call:
                if first and on_first is not None:
                    on_first(req, chunk)
                first = False
                if buffer:
                    held.append(chunk)
                else:
                    sent = True
                    yield chunk
            done = True
        except BackPressureError as err:
            done = True
            retry = max(1, math.ceil(getattr(err, "retry_after_s", None) or 1))
            raise APIError(503, f"model {model_id} is overloaded; retry later", type_="overloaded_error",
                           code="overloaded", headers={"Retry-After": str(retry)}) from None
        except InvalidRequestError as err:
            done = True
            raise APIError(400, _message(err), code="invalid_sampling_params") from None
        except dead as err:
            done = True
            if sent or attempt == retries:
                raise APIError(503, f"the replica serving this request failed: {type(err).__name__}",
                               type_="server_error", code="replica_failed", headers={"Retry-After": "1"}) from None
            logger.warning("replica failed before anything reached the client (%s); retry %d of %d",
                           type(err).__name__, attempt + 1, retries)
            await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            req.request_id = uuid.uuid4().hex
            continue
        except RayTaskError as err:
            done = True
            logger.error("replica error for request %s: %s", req.request_id, err)
            raise APIError(500, f"the replica failed to serve this request: {_message(err)}",
                           type_="server_error", code="replica_error") from None
        finally:
            if not done:  # the caller stopped (deadline, disconnect, a failed sibling): abort in the engine
                call.cancel()
        for chunk in held:
            yield chunk
        return
