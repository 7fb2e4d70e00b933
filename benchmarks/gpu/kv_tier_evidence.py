"""What one ``kv_tier_e2e`` run's two scrapes of Ray's metrics say: tier and router sums, and where requests waited.

Owns ``metric_sums`` (``kvserve_kv_tier_*`` / ``kvserve_router_*`` samples summed over their labels),
``router_kv_evidence`` (the router's view of the KV events) and ``run_evidence`` (pure: two parsed scrapes ->
the run's ``evidence`` dict). ``run_evidence`` reuses ``routing_h2h.evidence.derive`` (requests per replica,
``stages_ms`` of the ingress request path, ``engine_stage_ms_by_replica``, vLLM's per-replica queue / prefill /
TTFT in ``engine_by_replica``) and adds, over all replicas:

* ``engine_ms``: vLLM's queue / prefill / decode / TTFT / e2e histograms (count, mean, p50, p90 in ms).
  vLLM records a request as scheduled when it starts running, so its queue time includes the wait in
  WAITING_FOR_REMOTE_KVS: queue minus the tier's load latency is roughly the waiting queue proper;
* ``kv_tier_load_ms`` (``kvserve_kv_tier_load_latency_milliseconds``: submit -> loaded) and
  ``kv_tier_load_phases_ms`` (``kvserve_kv_tier_load_phase_milliseconds`` by phase: queue for a loader thread,
  directory locate, the ``ray.get`` of the chunks, the H2D copy up to its sync; ``deployments/kv_tier/load.py``).

Means are bucket-midpoint approximations and p50/p90 interpolate buckets (Ray 2.60's agent rebuilds
histograms from bucket counts; ``routing_h2h.evidence`` says more).
"""

from __future__ import annotations

from typing import Any

from benchmarks.routing_h2h.evidence import Samples, derive, histogram

#: key in ``engine_ms`` -> vLLM histogram (seconds) through Ray's agent.
VLLM_ALL = {"queue": "ray_vllm_request_queue_time_seconds", "prefill": "ray_vllm_request_prefill_time_seconds",
            "decode": "ray_vllm_request_decode_time_seconds", "ttft": "ray_vllm_time_to_first_token_seconds",
            "e2e": "ray_vllm_e2e_request_latency_seconds"}
TIER_LOAD_MS = "ray_kvserve_kv_tier_load_latency_milliseconds"
TIER_PHASE_MS = "ray_kvserve_kv_tier_load_phase_milliseconds"


def metric_sums(samples: dict) -> dict[str, float]:
    """kvserve tier / router samples summed over their labels (router decisions kept per reason, tier load
    phases per phase)."""
    out: dict[str, float] = {}
    for (name, labels), v in samples.items():
        if ("kvserve_kv_tier_" not in name and "kvserve_router_" not in name) or name.endswith("_bucket"):
            continue
        key = name.removeprefix("ray_kvserve_")
        if "router_decisions" in key and 'reason="' in labels:
            key += ":" + labels.split('reason="')[1].split('"')[0]
        if 'phase="' in labels:
            key += ":" + labels.split('phase="')[1].split('"')[0]
        out[key] = out.get(key, 0.0) + v
    return out


def router_kv_evidence(metrics: dict[str, float]) -> dict:
    """The router's own view of the KV events and of what they predicted (deltas over the bench): events it
    consumed (all media; there is no per-medium counter), predicted vs actual cached tokens."""
    ev = {k: metrics.get(k) for k in ("router_kv_events_total", "router_predicted_cached_tokens_total",
                                      "router_actual_cached_tokens_total")}
    pred, act = ev["router_predicted_cached_tokens_total"], ev["router_actual_cached_tokens_total"]
    ev["actual_over_predicted"] = round(act / pred, 3) if pred and act is not None else None
    n = metrics.get("router_cached_tokens_prediction_error_tokens_count")
    ev["prediction_error_mean_tokens"] = (
        round(metrics.get("router_cached_tokens_prediction_error_tokens_sum", 0.0) / n, 1) if n else None)
    return ev


def run_evidence(before: Samples, after: Samples, deployment: str) -> dict[str, Any]:
    """The run's evidence from the scrapes around its bench (pure): ``routing_h2h.evidence.derive`` for the vLLM
    ``deployment`` plus ``engine_ms``, ``kv_tier_load_ms`` and ``kv_tier_load_phases_ms`` (module docstring)."""
    out = derive(before, after, deployment)
    out["engine_ms"] = {k: h[""] for k, m in VLLM_ALL.items() if (h := histogram(before, after, m, "", 1000.0))}
    out["kv_tier_load_ms"] = histogram(before, after, TIER_LOAD_MS, "").get("")
    out["kv_tier_load_phases_ms"] = histogram(before, after, TIER_PHASE_MS, "phase")
    return out
