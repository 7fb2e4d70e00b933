"""Calibration: the fit recovers a known engine from cells the simulator itself produced, and the
GPU JSON is read into cells and fixed engine fields as the routing head-to-head wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.simulator.calibrate import Cell, fit, fixed_engine, gpu_cells, ordering, residuals, simulate_cell
from benchmarks.simulator.engine import EngineModel

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"workloads": {"docqa": ["--workload", "docqa", "--docs", "4", "--doc-tokens", "1024:2048",
                                    "--question-tokens", "32:64", "--output-len", "16"]}}
TRUE = EngineModel(prefill_tokens_per_s=40_000, step_s=0.004, decode_s_per_seq=1e-4, kv_blocks=512,
                   replicas_per_gpu=2, gpu_contention=0.2)


def _cells(strategy: str = "round-robin") -> list[Cell]:
    out = []
    for load, mode, level in (("sat", "concurrency", 16.0), ("r70", "rate", 30.0)):
        probe = Cell(strategy, "docqa", load, mode, level, 4.0, {})
        measured = simulate_cell(probe, TRUE, SETTINGS, 2)
        out.append(Cell(strategy, "docqa", load, mode, level, 4.0, measured))
    return out


def test_fit_recovers_the_engine_that_produced_the_cells():
    start = TRUE.with_(prefill_tokens_per_s=10_000, step_s=0.016)
    fitted, info = fit(_cells(), start, SETTINGS, 2, rounds=2, free=("prefill_tokens_per_s", "step_s"),
                       log=lambda m: None)
    assert info["loss"] < 0.01
    assert fitted.prefill_tokens_per_s == pytest.approx(40_000, rel=0.3)
    assert fitted.step_s == pytest.approx(0.004, rel=0.3)
    rows = residuals(_cells("prefix-aware"), fitted, SETTINGS, 2)
    assert all(abs(r["ttft_p50_error"]) < 0.25 for r in rows)


def test_ordering_compares_the_gpu_and_simulated_ranking():
    rows = [{"workload": "w", "load": "sat", "strategy": s, "gpu_ttft_p50_ms": g, "sim_ttft_p50_ms": m}
            for s, g, m in (("round-robin", 500, 400), ("prefix-aware", 200, 150), ("kv-aware", 150, 160))]
    o = ordering(rows)["w/sat"]
    assert o["gpu"] == ["kv-aware", "prefix-aware", "round-robin"]
    assert o["sim"] == ["prefix-aware", "kv-aware", "round-robin"]
    assert not o["same_best"] and not o["same_order"]


def test_gpu_json_is_read_into_cells_and_fixed_fields():
    routing = json.loads((ROOT / "benchmarks/results/routing_h100.json").read_text())
    cells = gpu_cells(routing)
    assert {c.strategy for c in cells} == {"round-robin", "prefix-aware", "kv-aware"}  # Ray's router is not modelled
    assert {(c.workload, c.load, c.mode) for c in cells} >= {("docqa", "sat", "concurrency"), ("multiturn", "r70", "rate")}
    tier = {"effective_load_gbps": 12.5}
    over = {"ttft_p50_delta_ms_c1": 8.0}
    e = fixed_engine(routing, tier, over, replicas=4, model_shape="llama-3.2-1b")
    assert (e.kv_blocks, e.replicas_per_gpu, e.tier_gbps, e.request_overhead_s) == (4096, 4, 12.5, 0.008)
    assert e.kv_bytes_per_token == 32768
    with pytest.raises(ValueError, match="unknown EngineModel fields"):
        EngineModel.from_dict({**e.to_dict(), "prefil_tokens_per_s": 1.0})
