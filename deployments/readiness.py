"""Which models can serve now: a snapshot of each model's replica states, refreshed in the background.

Owns: ``ModelReadiness`` (one model's replica counts and its state: ``ready``, ``scaled_to_zero``
(autoscaled to no replica; a request makes Serve start one, so requests pass), ``starting`` or
``unavailable``), ``Readiness`` (the snapshot the ingress reads on every request without any call:
``check`` raises a 503 with ``Retry-After`` for a model that has no running replica, ``models_body``
and ``health`` shape ``/v1/models`` and ``/health``; ``running`` gives any deployment of the app's
running replica count, which the ingress's rate limits divide by) and ``serve_status_source`` (the default source,
Ray Serve's public ``serve.status()``, polled on a daemon thread because it blocks).

Polling: every ``refresh_s`` (1 s) while anything changes, every ``settled_refresh_s`` (5 s) once every deployment of
the report is HEALTHY (at its target, no replica starting or stopping) and every model serves. A status call is
not cheap: ``serve.status()`` builds Serve's whole instance details, and each deployment's request-router config
cloudpickles its router class by value on the way, in the ingress process with the GIL held
(``benchmarks/results/readiness_poll_cpu.json``); a settled app changes only through a replica's failure or an
autoscaling decision, which turns the deployment's status and the polling fast again at the next poll.

The snapshot starts empty: until the first status arrives every model is ``starting``. A failed
refresh keeps the last snapshot (a controller restart does not make models disappear).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from deployments.openai_api import APIError

logger = logging.getLogger(__name__)

_STARTING_STATES = ("STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")
_SETTLED = ("HEALTHY", "UPSCALING", "DOWNSCALING")  # the deployment reached (or is autoscaling from) its target


@dataclass(frozen=True, slots=True)
class ModelReadiness:
    """One model's replicas as Serve last reported them."""

    model_id: str
    running: int = 0
    starting: int = 0
    deployment_status: str = "UNKNOWN"
    message: str = ""

    @property
    def state(self) -> str:
        if self.running > 0:
            return "ready"
        if self.deployment_status in _SETTLED and self.starting == 0:
            return "scaled_to_zero"  # autoscaling at min_replicas 0: a request makes Serve start one
        if self.deployment_status in ("DEPLOY_FAILED", "UNHEALTHY") and self.starting == 0:
            return "unavailable"
        return "starting"

    @property
    def serves(self) -> bool:
        """Whether a request should go to the deployment (it has a replica, or Serve starts one for it)."""
        return self.state in ("ready", "scaled_to_zero")

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.model_id, "status": self.state, "running_replicas": self.running,
                "starting_replicas": self.starting, "deployment_status": self.deployment_status}


StatusSource = Callable[[], Mapping[str, Any]]
"""Returns ``{deployment name: DeploymentStatusOverview-like}`` for the ingress's own application
(objects with ``status``, ``replica_states`` (state name -> count) and ``message``)."""


def serve_status_source(app_name: str) -> StatusSource:
    """The deployments of ``app_name`` from ``serve.status()`` (blocking; call it off the event loop)."""

    def fetch() -> Mapping[str, Any]:
        from ray import serve

        app = serve.status().applications.get(app_name)
        return app.deployments if app is not None else {}

    return fetch


def _status(deployment: Any) -> str:
    """A deployment's status as its name (Serve reports an enum)."""
    status = getattr(deployment, "status", "UNKNOWN")
    return str(getattr(status, "value", status))


def _count(states: Mapping[Any, int], names: tuple[str, ...]) -> int:
    return sum(int(n) for s, n in states.items() if str(getattr(s, "value", s)) in names)


class Readiness:
    """Per-model readiness from the replica states of each model's deployment."""

    def __init__(self, deployments: Mapping[str, str], source: StatusSource, refresh_s: float = 1.0,
                 retry_after_s: int = 10, settled_refresh_s: float = 5.0) -> None:
        self._deployments = dict(deployments)  # model id -> deployment name
        self._source = source
        self._refresh_s = refresh_s
        self._settled_refresh_s = max(settled_refresh_s, refresh_s)
        self._settled = False
        self._retry_after_s = retry_after_s
        self._models = {m: ModelReadiness(m) for m in self._deployments}
        self._running: dict[str, int] = {}  # deployment name -> RUNNING replicas (the app's deployments only)
        self._updated_at: float | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._announced = False

    # --- snapshot --------------------------------------------------------------------------
    def update(self, deployments: Mapping[str, Any], now: float) -> None:
        """Replace the snapshot from one status report."""
        self._running = {str(name): _count(getattr(d, "replica_states", {}) or {}, ("RUNNING",))
                         for name, d in deployments.items()}
        for model_id, name in self._deployments.items():
            d = deployments.get(name)
            if d is None:
                self._models[model_id] = ModelReadiness(model_id)
                continue
            states = getattr(d, "replica_states", {}) or {}
            self._models[model_id] = ModelReadiness(
                model_id, running=_count(states, ("RUNNING",)), starting=_count(states, _STARTING_STATES),
                deployment_status=_status(d), message=str(getattr(d, "message", "")))
        self._updated_at = now
        self._settled = bool(deployments) and self.all_ready() and all(
            _status(d) == "HEALTHY" for d in deployments.values())
        if not self._announced and self.all_ready():
            self._announced = True
            logger.info("all models ready: %s", sorted(self._models))

    def refresh(self, now: float) -> bool:
        """Fetch and apply one status report (blocking); False when the source failed."""
        try:
            self.update(self._source(), now)
        except Exception as err:  # noqa: BLE001 - keep serving on the last snapshot
            self._settled = False
            logger.warning("readiness refresh failed (%s: %s); keeping the last snapshot", type(err).__name__, err)
            return False
        return True

    def running(self, deployment: str) -> int | None:
        """Running replicas of ``deployment`` in the last report (None before one, or if it was not in it)."""
        return self._running.get(deployment)

    def get(self, model_id: str) -> ModelReadiness:
        return self._models[model_id]

    def all_ready(self) -> bool:
        return all(m.serves for m in self._models.values())

    def interval(self) -> float:
        """Seconds to the next refresh: ``settled_refresh_s`` once the last report was settled, else ``refresh_s``."""
        return self._settled_refresh_s if self._settled else self._refresh_s

    # --- background refresh ----------------------------------------------------------------
    def start(self) -> None:
        """Refresh every ``interval()`` on a daemon thread (the source blocks; the event loop never waits)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvserve-readiness", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh(time.time())
            self._stop.wait(self.interval())

    def stop(self) -> None:
        self._stop.set()

    # --- what the ingress answers ----------------------------------------------------------
    def check(self, model_id: str) -> None:
        """Raise a 503 (OpenAI's error shape, with Retry-After) unless the model has a running replica."""
        m = self._models[model_id]
        if m.serves:
            return
        if m.state == "starting":
            msg = (f"model {model_id} is starting: no replica is running yet ({m.starting} starting); "
                   f"retry in {self._retry_after_s} s")
        else:
            msg = f"model {model_id} has no running replica (deployment {m.deployment_status}: {m.message})"
        raise APIError(503, msg, type_="service_unavailable", code="model_not_ready",
                       headers={"Retry-After": str(self._retry_after_s)}, model=model_id)

    def models_body(self, entry: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """``/v1/models``: ``data`` lists the models that can serve; the others are under ``pending``."""
        data = [{**entry(m), "status": r.state} for m, r in self._models.items() if r.serves]
        pending = [r.as_dict() for r in self._models.values() if not r.serves]
        return {"object": "list", "data": data, "pending": pending}

    def health(self) -> tuple[int, dict[str, Any]]:
        """``/health``: 200 when every model has a running replica, else 503; the body says which."""
        body = {"status": "ok" if self.all_ready() else "starting",
                "models": {m: r.state for m, r in self._models.items()}}
        if any(r.state == "unavailable" for r in self._models.values()):
            body["status"] = "degraded"
        return (200 if body["status"] == "ok" else 503), body
