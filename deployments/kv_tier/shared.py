"""What the KV tier's engine-side I/O modules share: joining Ray, metrics, lost objects.

Owns: ``ensure_ray`` (an engine process joins the cluster), ``inc``/``observe`` (the tier's
metrics, never raising) and ``LOST_ERRORS`` (the Ray errors that mean "the object is gone").

Ownership. Objects are owned by the engine process that put them (``ray.put(_owner=)`` is gone
in Ray 2.60). A separate owner actor would need a second copy of every chunk through the object
store (engine -> actor -> store) and would still die with its node; the tier is a cache, so when
an engine dies its objects are lost, a load reports ``OwnerDiedError``/``ObjectLostError``, the
blocks are reported as load errors (vLLM's ``kv_load_failure_policy="recompute"`` recomputes
them) and the directory forgets every chunk of that owner.
"""

from __future__ import annotations

import logging

import ray

logger = logging.getLogger(__name__)

# Ray errors that mean "the object is gone": a miss, never a failed request.
LOST_ERRORS = (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError,
               ray.exceptions.ObjectFetchTimedOutError, ray.exceptions.GetTimeoutError,
               ray.exceptions.ObjectReconstructionFailedError)


def ensure_ray(address: str | None, namespace: str) -> None:
    """Connect this process (an engine core or worker: its own Ray driver) to the cluster."""
    if ray.is_initialized():
        return
    ray.init(address=address or "auto", namespace=namespace, log_to_driver=False,
             ignore_reinit_error=True, configure_logging=False)


def inc(name: str, value: float, tags: dict[str, str]) -> None:
    try:
        from deployments.metrics import metrics

        getattr(metrics(), name).inc(value, tags=tags)
    except Exception:
        logger.debug("kv tier: metric %s failed", name, exc_info=True)


def observe(name: str, value: float, tags: dict[str, str]) -> None:
    try:
        from deployments.metrics import metrics

        getattr(metrics(), name).observe(value, tags=tags)
    except Exception:
        logger.debug("kv tier: metric %s failed", name, exc_info=True)
