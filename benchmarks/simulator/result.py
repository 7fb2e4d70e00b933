"""What one simulated run measured: ``Result`` (raw samples and counters) and its ``summary``.

Owns ``Result`` and ``deep_size`` (bytes held by an object graph, for the router index memory).
Percentiles are nearest-rank over the per-request samples, as ``kvserve bench`` reports them.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field

from benchmarks.bench.cost import DEFAULT_GPU_HOUR_USD, token_costs


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _mean_ms(xs: list[float]) -> float:
    return round(sum(xs) / len(xs) * 1e3, 2) if xs else 0.0


@dataclass
class Result:
    strategy: str
    ttft_s: list[float] = field(default_factory=list)
    engine_ttft_s: list[float] = field(default_factory=list)  # routed to a replica -> its first token there
    engine_input_s: list[float] = field(default_factory=list)  # ... to reaching its scheduler (the front end)
    engine_wait_s: list[float] = field(default_factory=list)  # ... to the step with its first prefill chunk
    engine_prefill_s: list[float] = field(default_factory=list)  # that step's start to its first token
    e2e_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    decision_s: list[float] = field(default_factory=list)
    sent: int = 0
    completed: int = 0
    retries: int = 0
    failed_replicas: int = 0
    scale_ups: int = 0
    scale_downs: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    tier_tokens: int = 0
    predicted_cached_tokens: int = 0
    output_tokens: int = 0
    busy_s: float = 0.0
    last_done: float = 0.0
    first_measured: float | None = None  # send time of the first measured request to complete
    gpu_seconds: float = 0.0
    replicas_end: int = 0
    gpus_end: int = 0
    events_applied: int = 0
    event_apply_s: float = 0.0
    index_bytes_per_ingress: int | None = None
    reasons: Counter = field(default_factory=Counter)
    per_replica: dict[str, int] = field(default_factory=dict)
    requests: list[dict] | None = None  # per measured request (``simulate(keep_requests=True)``), else None

    def summary(self, *, gpu_hour_usd: float = DEFAULT_GPU_HOUR_USD, per_replica: bool = True) -> dict:
        ms = lambda xs, q: round(pct(xs, q) * 1e3, 2)
        duration = self.last_done - (self.first_measured or 0.0)
        out = {
            "requests": self.completed, "sent": self.sent, "retries": self.retries,
            "ttft_p50_ms": ms(self.ttft_s, 0.5), "ttft_p90_ms": ms(self.ttft_s, 0.9),
            "ttft_p95_ms": ms(self.ttft_s, 0.95), "ttft_p99_ms": ms(self.ttft_s, 0.99),
            "ttft_mean_ms": _mean_ms(self.ttft_s),
            "engine_ttft_p50_ms": ms(self.engine_ttft_s, 0.5),
            "engine_ttft_mean_ms": _mean_ms(self.engine_ttft_s), "engine_input_mean_ms": _mean_ms(self.engine_input_s),
            "engine_wait_mean_ms": _mean_ms(self.engine_wait_s),
            "engine_prefill_mean_ms": _mean_ms(self.engine_prefill_s),
            "tpot_p50_ms": ms(self.tpot_s, 0.5), "e2e_p50_ms": ms(self.e2e_s, 0.5),
            "output_tok_per_s": round(self.output_tokens / duration, 1) if duration else 0.0,
            "requests_per_s": round(self.completed / duration, 2) if duration else 0.0,
            "cache_hit_rate": round((self.cached_tokens + self.tier_tokens) / max(self.prompt_tokens, 1), 4),
            "gpu_hit_rate": round(self.cached_tokens / max(self.prompt_tokens, 1), 4),
            "tier_hit_rate": round(self.tier_tokens / max(self.prompt_tokens, 1), 4),
            "predicted_hit_rate": round(self.predicted_cached_tokens / max(self.prompt_tokens, 1), 4),
            "router_decision_p50_us": round(pct(self.decision_s, 0.5) * 1e6, 1),
            "router_decision_p99_us": round(pct(self.decision_s, 0.99) * 1e6, 1),
            "events_applied": self.events_applied,
            "event_apply_us_per_event": (round(self.event_apply_s / self.events_applied * 1e6, 3)
                                         if self.events_applied else 0.0),
            "index_bytes_per_ingress": self.index_bytes_per_ingress,
            "replicas_end": self.replicas_end, "failed_replicas": self.failed_replicas,
            "scale_ups": self.scale_ups, "scale_downs": self.scale_downs,
            "reasons": dict(self.reasons),
            "cost": token_costs(gpus=self.gpu_seconds / self.last_done if self.last_done else 0.0, duration_s=duration,
                                input_tokens=self.prompt_tokens, output_tokens=self.output_tokens,
                                gpu_hour_usd=gpu_hour_usd),
        }
        if per_replica:
            out["requests_per_replica"] = self.per_replica
        return out


def deep_size(obj: object) -> int:
    """Bytes held by ``obj`` and everything it references (each object counted once)."""
    seen: set[int] = set()
    stack = [obj]
    total = 0
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif isinstance(o, (int, float, str, bytes, bool)) or o is None:
            continue
        else:
            if hasattr(o, "__dict__"):
                stack.append(vars(o))
            for cls in type(o).__mro__:
                for name in getattr(cls, "__slots__", ()):
                    if hasattr(o, name):
                        stack.append(getattr(o, name))
    return total
