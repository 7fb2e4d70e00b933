"""The Grafana dashboard of the service, as data.

Owns: ``build_dashboard`` (Grafana dashboard JSON model, schemaVersion 39) and ``METRICS_USED``.
Every query is written against the names Ray's exporter publishes (``ray_`` + the name declared in
deployments/metrics.py, ``_total`` on counters, ``_bucket`` on histograms) and filtered by the
``rayservice`` label that the PodMonitors add from the pods' ``app.kubernetes.io/instance`` label.
Panels: traffic, TTFT, latency, concurrency, cache hit rates (engine prefix cache, end to end, KV
tier), KV-tier bytes/evictions/losses/load latency, routing decisions, replicas, Ray nodes (from
the autoscaler's exporter, ``autoscaler_active_nodes`` / ``autoscaler_pending_nodes``, no prefix), and
refused requests (401s by reason, 429s by reason and tenant, the ingress's overload 503s).
"""

from __future__ import annotations

import re
from typing import Any

RATE = "[$__rate_interval]"


def _q(metric: str, extra: str = "") -> str:
    return f'{metric}{{rayservice=~"$rayservice"{extra}}}'


def _quantiles(metric: str, by: str | None = "model") -> list[tuple[str, str]]:
    keys, legend = ("le", "") if by is None else (f"le, {by}", f" {{{{{by}}}}}")
    return [(f"histogram_quantile({q}, sum by ({keys}) (rate({_q(metric)}{RATE})))", f"p{int(q * 100)}{legend}")
            for q in (0.5, 0.95, 0.99)]


def _ratio(num: str, den: str) -> str:
    return f"sum(rate({_q(num)}{RATE})) / clamp_min(sum(rate({_q(den)}{RATE})), 1e-9)"


def _hit_rate(hits: str, misses: str) -> str:
    h, m = f"sum(rate({_q(hits)}{RATE}))", f"sum(rate({_q(misses)}{RATE}))"
    return f"{h} / clamp_min({h} + {m}, 1e-9)"


#: (title, unit, [(PromQL, legend)]) in display order, two per row.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Requests / s by model and status", "reqps",
     [(f"sum by (model, status) (rate({_q('ray_model_invocations_total')}{RATE}))", "{{model}} {{status}}")]),
    ("Concurrent requests (ingress)", "short",
     [(f"sum by (model) ({_q('ray_model_concurrent_requests')})", "{{model}}")]),
    ("Time to first token (TTFT)", "ms", _quantiles("ray_model_ttfb_milliseconds_bucket")),
    ("End-to-end latency", "ms", _quantiles("ray_model_latency_milliseconds_bucket")),
    ("Prompt cache hit rate (tokens)", "percentunit", [
        (_ratio("ray_kvserve_cached_prompt_tokens_total", "ray_kvserve_prompt_tokens_total"), "end to end"),
        (_ratio("ray_vllm_prefix_cache_hits_total", "ray_vllm_prefix_cache_queries_total"), "vLLM prefix cache"),
    ]),
    ("KV tier hit rate (beyond the local prefix hit)", "percentunit", [
        (_hit_rate("ray_kvserve_kv_tier_hit_tokens_total", "ray_kvserve_kv_tier_miss_tokens_total"), "tokens"),
        (_hit_rate("ray_kvserve_kv_tier_hit_blocks_total", "ray_kvserve_kv_tier_miss_blocks_total"), "blocks"),
    ]),
    ("KV tier bytes", "bytes", [
        (f"sum by (model) ({_q('ray_kvserve_kv_tier_directory_bytes')})", "held {{model}}"),
        (f"sum by (model) (rate({_q('ray_kvserve_kv_tier_stored_bytes_total')}{RATE}))", "stored / s {{model}}"),
    ]),
    ("KV tier evictions, losses and failures / s", "ops", [
        (f"sum(rate({_q('ray_kvserve_kv_tier_evicted_blocks_total')}{RATE}))", "evicted blocks"),
        (f"sum(rate({_q('ray_kvserve_kv_tier_lost_blocks_total')}{RATE}))", "lost blocks"),
        (f"sum(rate({_q('ray_kvserve_kv_tier_load_failed_blocks_total')}{RATE}))", "failed block loads"),
        (f"sum(rate({_q('ray_kvserve_kv_tier_dropped_stores_total')}{RATE}))", "dropped stores"),
    ]),
    ("KV tier load latency", "ms", _quantiles("ray_kvserve_kv_tier_load_latency_milliseconds_bucket", None)[1:]),
    ("Tokens / s", "short", [
        (f"sum by (model) (rate({_q('ray_kvserve_prompt_tokens_total')}{RATE}))", "prompt {{model}}"),
        (f"sum by (model) (rate({_q('ray_kvserve_completion_tokens_total')}{RATE}))", "completion {{model}}"),
    ]),
    ("Routing decisions / s", "ops", [(
        f"sum by (strategy, reason) (rate({_q('ray_kvserve_router_decisions_total')}{RATE}))",
        "{{strategy}} {{reason}}")]),
    ("Routing decision latency", "µs",
     _quantiles("ray_kvserve_router_decision_latency_microseconds_bucket", None)[1:]),
    ("Router cache prediction: predicted vs actual cached tokens / s", "short", [
        (f"sum by (strategy) (rate({_q('ray_kvserve_router_predicted_cached_tokens_total')}{RATE}))",
         "predicted {{strategy}}"),
        (f"sum by (strategy) (rate({_q('ray_kvserve_router_actual_cached_tokens_total')}{RATE}))",
         "actual {{strategy}}"),
    ]),
    ("Router index blocks per replica", "short",
     [(f"max by (replica) ({_q('ray_kvserve_router_index_blocks')})", "{{replica}}")]),
    ("Replica queued prefill tokens", "short",
     [(f"max by (replica) ({_q('ray_kvserve_replica_queued_prefill_tokens')})", "{{replica}}")]),
    ("Replica running requests", "short",
     [(f"max by (replica) ({_q('ray_kvserve_replica_running_requests')})", "{{replica}}")]),
    ("vLLM KV cache usage", "percentunit",
     [(f"max by (ReplicaId) ({_q('ray_vllm_kv_cache_usage_perc')})", "{{ReplicaId}}")]),
    ("Serve replicas (healthy) and Ray nodes", "short", [
        (f"sum by (deployment) ({_q('ray_serve_deployment_replica_healthy')})", "replicas {{deployment}}"),
        # The autoscaler's own exporter (head port as-metrics, 44217) has no ray_ prefix.
        (f"max by (NodeType) ({_q('autoscaler_active_nodes')})", "active nodes {{NodeType}}"),
        (f"max by (NodeType) ({_q('autoscaler_pending_nodes')})", "pending nodes {{NodeType}}"),
    ]),
    ("Refused requests / s: API keys (401), tenant limits (429), overload (503)", "reqps", [
        (f"sum by (reason) (rate({_q('ray_kvserve_auth_rejected_requests_total')}{RATE}))", "401 {{reason}}"),
        (f"sum by (reason, tenant) (rate({_q('ray_kvserve_rate_limited_requests_total')}{RATE}))",
         "429 {{reason}} {{tenant}}"),
        (f"sum(rate({_q('ray_kvserve_admission_rejected_requests_total')}{RATE}))", "503 overloaded (ingress bound)"),
    ]),
]

METRICS_USED = sorted({m for _, _, qs in PANELS for e, _ in qs for m in re.findall(r"\b([a-z_]+)\{rayservice", e)})


def _panel(i: int, title: str, unit: str, queries: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend}
                    for j, (expr, legend) in enumerate(queries)],
    }


def build_dashboard() -> dict[str, Any]:
    """The dashboard JSON model (import it in Grafana or ship it via the sidecar ConfigMap)."""
    return {
        "uid": "kvserve",
        "title": "kvserve: LLM serving on Ray Serve + vLLM",
        "tags": ["kvserve", "ray", "vllm"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
            {"name": "rayservice", "type": "query", "label": "RayService", "includeAll": True, "multi": True,
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(ray_serve_deployment_replica_healthy, rayservice)", "refId": "rs"},
             "refresh": 2, "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": [_panel(i, t, u, qs) for i, (t, u, qs) in enumerate(PANELS)],
    }
