"""The routing head-to-head harness: derived configs, Ray's router's view of token prompts, the summary."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from benchmarks.routing_h2h.run import RAY_ROUTER, SCALES, SYSTEMS, serve_config, summarize, table
from serve_app.config import load_app_config

ROOT = Path(__file__).resolve().parents[2]

@pytest.mark.parametrize("system", list(SYSTEMS))
@pytest.mark.parametrize("config, scale", [("configs/cpu.yaml", "cpu"), ("configs/gpu-routing.yaml", "gpu")])
def test_each_system_config_differs_only_in_routing_and_engine_overrides(system: str, config: str, scale: str) -> None:
    base = yaml.safe_load((ROOT / config).read_text())
    overrides = SCALES[scale]["engine_kwargs"]
    cfg = serve_config(base, SYSTEMS[system], overrides)
    args = cfg["applications"][0]["args"]
    app = load_app_config(args)  # still a valid kvserve config
    assert app.models[0].engine_kwargs == {**base["applications"][0]["args"]["models"][0]["engine_kwargs"],
                                           **overrides}
    if system == "ray-prefix-cache-affinity":
        assert app.routing.request_router_class == RAY_ROUTER
    else:
        assert app.routing.strategy == system and app.routing.request_router_class is None
    rest = {k: v for k, v in args.items() if k not in ("routing", "models")}
    assert rest == {k: v for k, v in base["applications"][0]["args"].items() if k not in ("routing", "models")}
    assert base["applications"][0]["args"]["routing"] == {"strategy": "prefix-aware"}  # base left untouched


def test_ray_router_sees_shared_token_prefixes_as_shared_text() -> None:
    pytest.importorskip("ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router")
    from benchmarks.routing_h2h.ray_router import RayPrefixCacheAffinity, tokens_as_text

    router = RayPrefixCacheAffinity.__new__(RayPrefixCacheAffinity)  # no Serve state needed for extraction
    doc = list(range(100, 400))
    a = router._extract_text_from_request(SimpleNamespace(args=[SimpleNamespace(prompt_token_ids=doc + [1, 2])]))
    b = router._extract_text_from_request(SimpleNamespace(args=[SimpleNamespace(prompt_token_ids=doc + [3])]))
    assert len(a) == 302 and a[:300] == b[:300] and a[300] != b[300]
    tokens_as_text(list(range(0, 200_000, 997))).encode("utf-8")  # no surrogates: every id is encodable text


def _h(ttft: float, tps: float, hit: float | None = 0.5) -> dict:
    return {"ttft_p50_ms": ttft, "ttft_p90_ms": ttft * 2, "ttft_p99_ms": ttft * 3, "output_tok_per_s": tps,
            "cache_hit_rate": hit, "errors": 0}


def test_summary_ratios_are_taken_at_the_highest_load() -> None:
    results = {
        "round-robin": {"docqa": {"sat": _h(1000, 100), "r70": _h(10, 50)}, "no-sharing": {"sat": _h(400, 90)}},
        "prefix-aware": {"docqa": {"sat": _h(250, 150), "r70": _h(5, 50)}, "no-sharing": {"sat": _h(420, 90)}},
        "ray-prefix-cache-affinity": {"docqa": {"sat": _h(500, 120)}},
    }
    s = summarize(results)
    assert s["ttft_p50_ratio_vs_round_robin"] == 0.25
    assert s["ttft_p50_ratio_vs_ray_router"] == 0.5
    assert s["throughput_ratio_vs_round_robin"] == 1.5
    assert s["no_sharing_ttft_p50_ratio"] == 1.05
    assert s["by_strategy"]["kv-aware"]["no_sharing_ttft_p50_ratio"] is None  # not run: no made-up number
    md = table(results)
    assert "| docqa | sat | prefix-aware | 250 | 500 | 750 | 150.0 | 0.50 | 0 |" in md
    assert md.count("| docqa |") == 5
