"""The routing section of deployments/metrics.py: names, units, label sets (never per request)."""

from __future__ import annotations

import pytest

from deployments.metrics import metrics

pytestmark = pytest.mark.unit

EXPECTED = {
    "router_decisions": ("kvserve_router_decisions", ("model", "strategy", "reason")),
    "router_decision_latency_us": ("kvserve_router_decision_latency_microseconds", ("strategy",)),
    "router_predicted_cached_tokens": ("kvserve_router_predicted_cached_tokens", ("model", "strategy")),
    "router_actual_cached_tokens": ("kvserve_router_actual_cached_tokens", ("model", "strategy")),
    "router_prediction_error_tokens": ("kvserve_router_cached_tokens_prediction_error_tokens", ("model", "strategy")),
    "router_index_blocks": ("kvserve_router_index_blocks", ("model", "replica", "strategy")),
    "router_kv_events": ("kvserve_router_kv_events", ("model", "replica")),
    "router_outstanding_requests": ("kvserve_router_outstanding_requests", ("model", "replica", "strategy")),
    "router_queued_prefill_tokens": ("kvserve_router_queued_prefill_tokens", ("model", "replica", "strategy")),
    "router_prefill_tokens_per_s": ("kvserve_router_prefill_tokens_per_s", ("model", "replica", "strategy")),
    "router_kv_event_resets": ("kvserve_router_kv_event_resets", ("model", "replica")),
}
ALLOWED_LABELS = {"model", "replica", "strategy", "reason"}


@pytest.mark.parametrize("attr", sorted(EXPECTED))
def test_routing_metric_names_and_labels(attr):
    metric = getattr(metrics(), attr)
    name, labels = EXPECTED[attr]
    assert metric._name == name
    assert tuple(metric._tag_keys) == labels
    assert set(labels) <= ALLOWED_LABELS


def test_recording_needs_no_cluster():
    m = metrics()
    m.router_decisions.inc(1, tags={"model": "m", "strategy": "prefix-aware", "reason": "cache-hit"})
    m.router_decision_latency_us.observe(12.5, tags={"strategy": "prefix-aware"})
    m.router_prediction_error_tokens.observe(0, tags={"model": "m", "strategy": "prefix-aware"})
