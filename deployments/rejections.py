"""Counting the requests the ingress answers with an error before a model's request tracker exists.

Owns: ``status_label`` (HTTP status -> the ``status`` label of ``model_invocations_total``, shared
with the ingress's request tracker), ``model_label`` (a requested model id becomes the label only when
it names a served model: unknown ids share the label ``unknown``, so a client cannot grow the label
set) and ``record_rejection`` (one count for a 400 validation error, a 404 unknown model, a 503 model
that is not ready, ...). The ingress's exception handlers call it for errors no tracker counted.
``record_auth_rejection`` counts the 401s and 429s of ``deployments.auth.Gate`` by reason and tenant
(``unknown`` for a 401: the label set stays the configured tenants, whatever keys clients send).
"""

from __future__ import annotations

from collections.abc import Collection

from deployments.metrics import metrics

UNKNOWN_MODEL = "unknown"
UNKNOWN_TENANT = "unknown"


def status_label(http_status: int) -> str:
    return "client_error" if http_status < 500 else "server_error"


def model_label(model: object, known: Collection[str]) -> str:
    return model if isinstance(model, str) and model in known else UNKNOWN_MODEL


def record_rejection(http_status: int, model: object, known: Collection[str]) -> None:
    """Count one request that ended in an error response before reaching a model."""
    metrics().invocations.inc(1, tags={"model": model_label(model, known), "status": status_label(http_status)})


def record_auth_rejection(http_status: int, reason: str, tenant: str) -> None:
    """Count one request the gate refused: 401 (``reason`` missing_key/invalid_key) or 429 (the limit's name)."""
    assert http_status in (401, 429), f"not an auth refusal: {http_status}"
    if http_status == 401:
        metrics().auth_rejected_requests.inc(1, tags={"reason": reason, "tenant": UNKNOWN_TENANT})
    else:
        metrics().rate_limited_requests.inc(1, tags={"reason": reason, "tenant": tenant})
