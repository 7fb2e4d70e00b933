"""The KV-tier GPU cell in the simulator: TTFT of a prefix recomputed vs loaded from the tier.

Owns ``tier_cell``, ``fit_engine_floor`` (the in-process engine's per-request front end),
``fit_tier_hit_s`` (the fixed cost of a hit beyond the copy) and ``tier_row``. The GPU benchmark
(``benchmarks/gpu/kv_tier_h200.py``) times engines in-process (token ids in, no HTTP, no tokeniser):
one engine computes a prefix of ``P`` tokens plus a suffix, a second engine then serves the same prefix
with another suffix (a tier hit), the same prompt again from its own GPU cache (a GPU-cache hit), a
32-token prompt alone, and a fresh prefix of the same length (a recompute). ``tier_cell`` replays
exactly that on two simulated replicas sharing a tier, round-robin, one request at a time, with no
HTTP, ingress or client costs, and the ``LLM`` class's prefill budget (``LLM_CLASS_CHUNK_TOKENS``).
What the in-process engine still spends outside the GPU step (vLLM's input processing without the
tokeniser, the hop to the engine core and back) is its front end, ``floor`` = (``input_s_per_request``,
``input_s_per_ktok``), fitted by ``fit_engine_floor`` from the two floors the benchmark measures (the
32-token prompt and the GPU-cache hit: two prompt lengths).
"""

from __future__ import annotations

import statistics

from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.load import Driver, LoadPlan, SimSession, Turn
from benchmarks.simulator.sim import ClusterSpec, simulate
from benchmarks.simulator.workloads import chain_keys
from serve_app.config.routing import RoutingConfig

#: vLLM's default ``max_num_batched_tokens`` for the ``LLM`` class on a GPU of >= 70 GiB that is not an
#: A100 (``EngineArgs``; the API server's is 8,192): the benchmark's engines set none, so a prompt of up
#: to this many tokens is prefilled in one step.
LLM_CLASS_CHUNK_TOKENS = 16384


def tier_cell(engine: EngineModel, prefix_tokens: int, suffix_tokens: int = 32,
              floor: tuple[float, float] = (0.0, 0.0), chunk_tokens: int = LLM_CLASS_CHUNK_TOKENS) -> dict:
    """Simulated TTFT (ms) of the tier hit, the recompute, the GPU-cache hit and a ``suffix_tokens``
    prompt alone, and the tokens taken from the tier; ``floor`` is the engine's front end (s per
    request, s per 1K prompt tokens), ``chunk_tokens`` its prefill budget per step."""
    bs = engine.block_size
    prompt = prefix_tokens + suffix_tokens

    def turn(prefix: int, suffix: int, prefix_len: int = prefix_tokens) -> SimSession:
        ids = [(1, prefix, b) for b in range(prefix_len // bs)]
        ids += [(2, suffix, b) for b in range(suffix_tokens // bs)]
        return SimSession(f"s{prefix}/{suffix}", [Turn(prefix_len + suffix_tokens, 1, chain_keys(ids))])

    # round-robin over A, B: A computes the prefix, B takes it from the tier (hit), A a fresh prefix
    # (recompute), B the first prefix again from its own GPU cache, A a suffix-only prompt
    sessions = [turn(1, 1), turn(1, 2), turn(2, 3), turn(1, 4), turn(3, 5, prefix_len=0)]
    engine = engine.with_(chunk_tokens=chunk_tokens, request_overhead_s=0.0, input_s_per_request=floor[0],
                          input_s_per_ktok=floor[1],
                          frontend_s_per_request=0.0, frontend_s_per_token=0.0, client_s_per_request=0.0,
                          client_s_per_token=0.0)
    budget = 4 * prompt // bs
    res = simulate(Driver(iter(sessions), LoadPlan("concurrency", 1, num_requests=len(sessions))),
                   RoutingConfig(strategy="round-robin").knobs(), ClusterSpec(2, tier_budget_blocks=budget), engine)
    _, hit, recompute, gpu_hit, short = res.ttft_s
    return {"tier_hit_ms": round(hit * 1e3, 1), "recompute_ms": round(recompute * 1e3, 1),
            "gpu_cache_hit_ms": round(gpu_hit * 1e3, 1), "short_prompt_ms": round(short * 1e3, 1),
            "tier_tokens": res.tier_tokens}


def fit_engine_floor(engine: EngineModel, tier: dict, suffix_tokens: int = 32) -> tuple[float, float, str] | None:
    """The in-process engine's front end (s per request, s per 1K prompt tokens) from a KV-tier JSON's
    floors, or None without them: each floor less its modelled GPU part (the step and the suffix's
    prefill, after the cached prefix for the GPU-cache hit) is the front end at that prompt length
    (``suffix_tokens`` alone, ``prefix_tokens + suffix_tokens``); a line through the two, both terms >= 0."""
    short, local = tier.get("ttft_short_prompt_ms"), tier.get("ttft_gpu_cache_hit_ms")
    if short is None or local is None:
        return None
    p = int(tier["prefix_tokens"])
    gpu = tier_cell(engine, p, suffix_tokens)
    over_short = float(short) - gpu["short_prompt_ms"]
    over_long = float(local) - gpu["gpu_cache_hit_ms"]
    per_ktok = max(0.0, (over_long - over_short) / (p / 1e3))
    fixed = max(0.0, over_short - per_ktok * suffix_tokens / 1e3)
    how = (f"ttft_short_prompt_ms {short} - modelled {gpu['short_prompt_ms']} ms at {suffix_tokens} tokens, "
           f"ttft_gpu_cache_hit_ms {local} - modelled {gpu['gpu_cache_hit_ms']} ms at {p + suffix_tokens} tokens: "
           "a line through the two")
    return fixed / 1e3, per_ktok / 1e3, how


def fit_tier_hit_s(engine: EngineModel, tier: dict, floor: tuple[float, float] = (0.0, 0.0)) -> tuple[float, str]:
    """The fixed cost of a tier hit (``EngineModel.tier_hit_s``) from a KV-tier JSON, and how it was fitted.

    With the floors ``ttft_gpu_cache_hit_ms`` (the same prompt served from the GPU's own prefix cache:
    the engine's front end, the suffix's prefill and the step) and ``load_ms`` (the copy as timed in the
    worker), the cost is the hit's TTFT less both; without them it is the hit's TTFT less the modelled
    copy (``tier_gbps``), the modelled suffix prefill and the front end ``floor``, i.e. fitted from the
    hit alone, so the simulated hit matches it.
    """
    hit_ms = float(tier["ttft_tier_hit_ms"])
    if tier.get("ttft_gpu_cache_hit_ms") is not None and tier.get("load_ms") is not None:
        load = tier["load_ms"]  # one figure, or one per round (kv_tier_h200/1 at 5bc5f4b): their median
        load_ms = statistics.median(load) if isinstance(load, list) else float(load)
        cost_ms = hit_ms - float(tier["ttft_gpu_cache_hit_ms"]) - load_ms
        how = f"ttft_tier_hit_ms - ttft_gpu_cache_hit_ms - load_ms (measured floors; load {load_ms} ms)"
    else:
        modelled = tier_cell(engine.with_(tier_hit_s=0.0), int(tier["prefix_tokens"]), floor=floor)["tier_hit_ms"]
        cost_ms = hit_ms - modelled
        how = (f"from the hit alone: ttft_tier_hit_ms {hit_ms} - modelled copy and suffix prefill {modelled} ms "
               "(the JSON has no ttft_gpu_cache_hit_ms / load_ms floors)")
    return max(0.0, cost_ms) / 1e3, how


def tier_row(engine: EngineModel, *, prefix_tokens: int, recompute_ms: float, tier_hit_ms: float, source: str,
             floor: tuple[float, float] = (0.0, 0.0), gpu_cache_hit_ms: float | None = None,
             short_prompt_ms: float | None = None) -> dict:
    """Measured vs simulated for one KV-tier result (``floor``: the engine's front end, ``tier_cell``)."""
    sim = tier_cell(engine, prefix_tokens, floor=floor)
    row = {"source": source, "prefix_tokens": prefix_tokens, "gpu_recompute_ms": recompute_ms,
           "sim_recompute_ms": sim["recompute_ms"],
           "recompute_error": round(sim["recompute_ms"] / recompute_ms - 1, 3),
           "gpu_tier_hit_ms": tier_hit_ms, "sim_tier_hit_ms": sim["tier_hit_ms"],
           "tier_hit_error": round(sim["tier_hit_ms"] / tier_hit_ms - 1, 3), "sim_tier_tokens": sim["tier_tokens"],
           "sim_gpu_cache_hit_ms": sim["gpu_cache_hit_ms"], "sim_short_prompt_ms": sim["short_prompt_ms"]}
    if gpu_cache_hit_ms is not None:
        row["gpu_gpu_cache_hit_ms"] = gpu_cache_hit_ms
    if short_prompt_ms is not None:
        row["gpu_short_prompt_ms"] = short_prompt_ms
    return row
