"""The ingress's bounds on generation requests in flight: beyond the models' queues, a fast 503.

Owns: ``AdmissionMiddleware`` (ASGI: counts the generation requests, POST ``/v1/chat/completions`` and
``/v1/completions``, of this ingress replica from their arrival to the end of their response, and answers one
over the bound with a 503 ``overloaded`` in OpenAI's shape with Retry-After, before its body is read),
``Admission`` (that bound, and each model's: ``hold``, the requests this ingress replica has at one model's
replicas) and ``serve_max_queued_requests`` (the queue bound handed to Serve for a model's replicas).

Why: Serve bounds a model's replicas itself (``max_ongoing_requests`` per replica, ``max_queued_requests`` per
caller), but that bound is met only in dispatch, after the ingress has parsed and validated the body and rendered,
tokenized and hashed the prompt on its one event loop. In a burst every request paid that work before its 503:
on 2 cores 384 requests at 2x the queues' capacity got their 503s after 9.4 s (p50) and 12.2 s (p99)
(benchmarks/results/hardening.json at 459e692). Here the 503 costs a counter compare, made in the task that
received the request: the ingress runs its app on Serve's receiving loop (``settings.INGRESS_LOOP_ENV``), so the
check does not wait for a user-code thread busy preparing the requests admitted before it.

The bound of one ingress replica for one model is its share of the running replicas' slots
(``running x max_ongoing_requests / running ingress replicas``, rounded up) plus ``max_queued_requests`` (Serve's
queue is per caller, so each ingress replica has one); the request-level bound sums it over the models. A model
whose queue is unbounded (-1) makes both unbounded. A batched completion request counts once in the request-level
bound and once per prompt in its model's (each prompt is a request to Serve).

The model's bound is kept here, not by Serve: Serve counts against ``max_queued_requests`` every request it has not
yet sent to a replica, including those it is still assigning to a replica with free slots (a queue-length probe, a
busy router loop), so in a burst it refused requests while the replicas had room (docs/security.md). Serve keeps a
bound of its own that the ingress's cannot exceed (``serve_max_queued_requests``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from deployments.metrics import metrics
from deployments.openai_api import APIError

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


@dataclass(frozen=True)
class ModelQueue:
    """One model's queue options: the replicas' ``max_ongoing_requests`` and ``max_queued_requests``,
    its deployment name and the replica count assumed before Serve reports one."""

    deployment: str
    max_ongoing_requests: int
    max_queued_requests: int
    replicas: int


class Admission:
    """The in-flight bound of one ingress replica and its counter."""

    def __init__(self, models: Sequence[ModelQueue], running: Callable[[str], int | None], ingress: str,
                 retry_after_s: int = 1) -> None:
        self._models = tuple(models)
        self._running = running  # deployment name -> RUNNING replicas in the last report (None: not known)
        self._ingress = ingress
        self.retry_after_s = retry_after_s
        self.inflight = 0
        self.held: dict[str, int] = {}  # deployment -> requests this replica has at its replicas now

    @classmethod
    def from_app(cls, cfg: Any, deployments: Mapping[str, str], running: Callable[[str], int | None],
                 ingress: str) -> Admission:
        """From ``AppConfig`` and {model id: deployment name}."""
        models, retry = [], 1
        for m in cfg.models:
            d = m.deployment
            scale = d.autoscaling_config or {}
            replicas = d.num_replicas if d.num_replicas is not None else int(
                scale.get("initial_replicas") or scale.get("min_replicas") or 1)
            models.append(ModelQueue(deployments[m.id], d.max_ongoing_requests, d.max_queued_requests, replicas))
            retry = max(retry, math.ceil(float((d.backpressure_config or {}).get("retry_after_s", 1))))
        return cls(models, running, ingress, retry)

    def limit(self) -> int | None:
        """Generation requests this ingress replica admits at once (None: unbounded)."""
        limits = [self._model_limit(m) for m in self._models]
        return None if any(n is None for n in limits) else sum(limits)

    def model_limit(self, deployment: str) -> int | None:
        """Requests this ingress replica has at one model's replicas at once (None: unbounded)."""
        return self._model_limit(next(m for m in self._models if m.deployment == deployment))

    def _model_limit(self, m: ModelQueue) -> int | None:
        if m.max_queued_requests < 0:
            return None
        share = max(1, self._running(self._ingress) or 1)
        running = self._running(m.deployment)
        replicas = m.replicas if running is None else running
        return math.ceil(replicas * m.max_ongoing_requests / share) + m.max_queued_requests

    @contextmanager
    def hold(self, deployment: str, model_id: str) -> Iterator[None]:
        """Count one request at ``deployment``'s replicas while the block runs; over the model's bound, raise
        the 503 ``overloaded`` instead."""
        limit, held = self.model_limit(deployment), self.held.get(deployment, 0)
        if limit is not None and held >= limit:
            metrics().admission_rejected_requests.inc(1)
            raise APIError(503, f"model {model_id} is overloaded; retry later", type_="overloaded_error",
                           code="overloaded", headers={"Retry-After": str(self.retry_after_s)})
        self.held[deployment] = held + 1
        try:
            yield
        finally:
            self.held[deployment] -= 1

    def overloaded(self, limit: int) -> APIError:
        return APIError(503, f"the server is overloaded ({limit} requests in flight); retry later",
                        type_="overloaded_error", code="overloaded", headers={"Retry-After": str(self.retry_after_s)})


def serve_max_queued_requests(max_ongoing_requests: int, max_queued_requests: int, most_replicas: int) -> int:
    """Serve's ``max_queued_requests`` for a model's replicas: the largest bound ``Admission.hold`` can have (all
    replicas up, one ingress replica), so Serve's own check never refuses a request the ingress admitted
    (-1 stays unbounded)."""
    if max_queued_requests < 0:
        return max_queued_requests
    return most_replicas * max_ongoing_requests + max_queued_requests


class AdmissionMiddleware:
    """ASGI middleware: the replica's ``Ingress.admission`` bound on generation requests in flight."""

    def __init__(self, app: Any, admission_of: Callable[[], Admission | None] | None = None) -> None:
        self.app, self._admission_of = app, admission_of or _replica_admission

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        admission = self._admission_of()
        limit = admission.limit() if admission is not None else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        if admission.inflight >= limit:
            err = admission.overloaded(limit)
            metrics().admission_rejected_requests.inc(1)
            await JSONResponse(err.body(), status_code=503, headers=err.headers)(scope, receive, send)
            return
        admission.inflight += 1
        try:
            await self.app(scope, receive, send)  # returns once the response (a stream too) has ended
        finally:
            admission.inflight -= 1


def _replica_admission() -> Admission | None:
    """``admission`` of the Serve replica's instance (the Ingress), found as Serve finds it."""
    from ray import serve

    return getattr(serve.get_replica_context().servable_object, "admission", None)
