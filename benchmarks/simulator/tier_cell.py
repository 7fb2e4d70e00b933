"""The KV-tier GPU cell in the simulator: TTFT of a prefix recomputed vs loaded from the tier.

Owns ``tier_cell`` and ``tier_row``. The GPU benchmark (``benchmarks/gpu/kv_tier_h200.py``) times
engines in-process (token ids in, no HTTP, no tokeniser): one engine computes a prefix of ``P``
tokens plus a suffix, a second engine then serves the same prefix with another suffix (a tier hit),
and a fresh prefix of the same length (a recompute). ``tier_cell`` replays exactly that on two
simulated replicas sharing a tier, round-robin, one request at a time, with the engine's front end
and per-request overhead set to zero.
"""

from __future__ import annotations

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


def tier_row(engine: EngineModel, *, prefix_tokens: int, recompute_ms: float, tier_hit_ms: float, source: str) -> dict:
    """Measured vs simulated for one KV-tier result."""
    sim = tier_cell(engine, prefix_tokens)
    return {"source": source, "prefix_tokens": prefix_tokens, "gpu_recompute_ms": recompute_ms,
            "sim_recompute_ms": sim["recompute_ms"],
            "recompute_error": round(sim["recompute_ms"] / recompute_ms - 1, 3),
            "gpu_tier_hit_ms": tier_hit_ms, "sim_tier_hit_ms": sim["tier_hit_ms"],
            "tier_hit_error": round(sim["tier_hit_ms"] / tier_hit_ms - 1, 3), "sim_tier_tokens": sim["tier_tokens"]}
