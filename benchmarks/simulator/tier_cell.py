"""The KV-tier GPU cell in the simulator: TTFT of a prefix recomputed vs loaded from the tier.

Owns ``tier_cell``, ``fit_tier_hit_s`` (the fixed cost of a hit beyond the copy) and ``tier_row``. The
GPU benchmark (``benchmarks/gpu/kv_tier_h200.py``) times engines in-process (token ids in, no HTTP, no
tokeniser): one engine computes a prefix of ``P`` tokens plus a suffix, a second engine then serves the
same prefix with another suffix (a tier hit), and a fresh prefix of the same length (a recompute).
``tier_cell`` replays exactly that on two simulated replicas sharing a tier, round-robin, one request at
a time, with the engine's front end and per-request overhead set to zero.
"""

from __future__ import annotations

import statistics

from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.load import Driver, LoadPlan, SimSession, Turn
from benchmarks.simulator.sim import ClusterSpec, simulate
from benchmarks.simulator.workloads import chain_keys
from serve_app.config.routing import RoutingConfig


def tier_cell(engine: EngineModel, prefix_tokens: int, suffix_tokens: int = 32) -> dict:
    """Simulated TTFT (ms) of the tier hit and of the recompute, and the tokens taken from the tier."""
    bs = engine.block_size
    prompt = prefix_tokens + suffix_tokens

    def turn(prefix: int, suffix: int) -> SimSession:
        ids = [(1, prefix, b) for b in range(prefix_tokens // bs)]
        ids += [(2, suffix, b) for b in range(suffix_tokens // bs)]
        return SimSession(f"s{prefix}/{suffix}", [Turn(prompt, 1, chain_keys(ids))])

    # computed on one replica, the same prefix on the other (tier hit), a fresh prefix (recompute)
    sessions = [turn(1, 1), turn(1, 2), turn(2, 3)]
    engine = engine.with_(request_overhead_s=0.0, input_s_per_request=0.0, frontend_s_per_request=0.0,
                          frontend_s_per_token=0.0)
    budget = 4 * prompt // bs
    res = simulate(Driver(iter(sessions), LoadPlan("concurrency", 1, num_requests=3)),
                   RoutingConfig(strategy="round-robin").knobs(), ClusterSpec(2, tier_budget_blocks=budget), engine)
    _, hit, recompute = res.ttft_s
    return {"tier_hit_ms": round(hit * 1e3, 1), "recompute_ms": round(recompute * 1e3, 1),
            "tier_tokens": res.tier_tokens}


def fit_tier_hit_s(engine: EngineModel, tier: dict) -> tuple[float, str]:
    """The fixed cost of a tier hit (``EngineModel.tier_hit_s``) from a KV-tier JSON, and how it was fitted.

    With the floors ``ttft_gpu_cache_hit_ms`` (the same prompt served from the GPU's own prefix cache:
    the suffix's prefill and the step) and ``load_ms`` (the copy as timed in the worker), the cost is
    the hit's TTFT less both; without them it is the hit's TTFT less the modelled copy (``tier_gbps``)
    and the modelled suffix prefill, i.e. fitted from the hit alone, so the simulated hit matches it.
    """
    hit_ms = float(tier["ttft_tier_hit_ms"])
    if tier.get("ttft_gpu_cache_hit_ms") is not None and tier.get("load_ms") is not None:
        load = tier["load_ms"]  # one figure, or one per round (kv_tier_h200/1 at 5bc5f4b): their median
        load_ms = statistics.median(load) if isinstance(load, list) else float(load)
        cost_ms = hit_ms - float(tier["ttft_gpu_cache_hit_ms"]) - load_ms
        how = f"ttft_tier_hit_ms - ttft_gpu_cache_hit_ms - load_ms (measured floors; load {load_ms} ms)"
    else:
        modelled = tier_cell(engine.with_(tier_hit_s=0.0), int(tier["prefix_tokens"]))["tier_hit_ms"]
        cost_ms = hit_ms - modelled
        how = (f"from the hit alone: ttft_tier_hit_ms {hit_ms} - modelled copy and suffix prefill {modelled} ms "
               "(the JSON has no ttft_gpu_cache_hit_ms / load_ms floors)")
    return max(0.0, cost_ms) / 1e3, how


def tier_row(engine: EngineModel, *, prefix_tokens: int, recompute_ms: float, tier_hit_ms: float, source: str) -> dict:
    """Measured vs simulated for one KV-tier result."""
    sim = tier_cell(engine, prefix_tokens)
    return {"source": source, "prefix_tokens": prefix_tokens, "gpu_recompute_ms": recompute_ms,
            "sim_recompute_ms": sim["recompute_ms"],
            "recompute_error": round(sim["recompute_ms"] / recompute_ms - 1, 3),
            "gpu_tier_hit_ms": tier_hit_ms, "sim_tier_hit_ms": sim["tier_hit_ms"],
            "tier_hit_error": round(sim["tier_hit_ms"] / tier_hit_ms - 1, 3), "sim_tier_tokens": sim["tier_tokens"]}
