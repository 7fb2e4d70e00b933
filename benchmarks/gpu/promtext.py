"""Reading servers' Prometheus text for the serving-overhead benchmark.

Owns ``scrape`` (one GET of a /metrics URL -> {(name, labels): value}), ``stage_means_ms`` (mean per
request-path stage between two scrapes, from kvserve's ``kvserve_stage_*_milliseconds`` histograms) and
``engine_means_ms`` (the same for vLLM's own queue / prefill / TTFT histograms, whether read from
``vllm serve`` (``vllm:``) or through Ray's metrics agent (``ray_vllm_``)).
"""

from __future__ import annotations

import re
import urllib.request

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([^\s]+)")
_ENGINE = {"queue": "request_queue_time_seconds", "prefill": "request_prefill_time_seconds",
           "ttft": "time_to_first_token_seconds"}


def parse(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _LINE.match(line)
        if m:
            try:
                out[(m.group(1), m.group(2) or "")] = float(m.group(3))
            except ValueError:
                continue
    return out


def scrape(url: str, timeout_s: float = 10) -> dict[tuple[str, str], float]:
    """Samples of ``url`` (empty if it cannot be read: the benchmark still reports the client's figures)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return parse(r.read().decode())
    except OSError:
        return {}


def _total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def _mean_delta(before: dict, after: dict, base: str, scale: float) -> float | None:
    count = _total(after, base + "_count") - _total(before, base + "_count")
    if count <= 0:
        return None
    return (_total(after, base + "_sum") - _total(before, base + "_sum")) / count * scale


def stage_means_ms(before: dict, after: dict) -> dict[str, float | None]:
    """Stage -> mean milliseconds per request between the scrapes (kvserve's histograms via Ray's agent)."""
    from deployments.stages import STAGES

    out = {s: _mean_delta(before, after, f"ray_kvserve_stage_{s}_milliseconds", 1.0) for s in (*STAGES, "route")}
    out["server_ttfb"] = _mean_delta(before, after, "ray_model_ttfb_milliseconds", 1.0)
    return out


def engine_means_ms(before: dict, after: dict) -> dict[str, float | None]:
    """vLLM's queue / prefill / TTFT means in milliseconds between the scrapes."""
    out = {}
    for key, metric in _ENGINE.items():
        for prefix in ("vllm:", "ray_vllm_", "ray_vllm:"):
            mean = _mean_delta(before, after, prefix + metric, 1000.0)
            if mean is not None:
                out[key] = mean
                break
        else:
            out[key] = None
    return out
