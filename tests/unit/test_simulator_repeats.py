"""A routing cell measured more than once is compared at its median run (``benchmarks/simulator/repeats.py``):
the median copy by TTFT p50 is a measured run with its own evidence and (Ray's twin) its own earlier cells, every
run's p50 goes beside it in the residual row, and a copy of another load, scale or GPU is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.repeats import with_repeats
from benchmarks.simulator.routing_cells import residual_table, residuals

pytestmark = pytest.mark.unit

RAY = "benchmarks.routing_h2h.ray_router:RayPrefixCacheAffinity"
WL = {"docqa": ["--workload", "docqa", "--docs", "4", "--doc-tokens", "256:512", "--output-len", "8"],
      "multiturn": ["--workload", "multiturn", "--sessions", "8", "--turns", "2", "--system-words", "64",
                    "--user-words", "8:16", "--output-len", "8"]}
SAT = {"mode": "concurrency", "concurrency": 8, "duration_s": 3}


def _cell(p50: float, load: dict = SAT, tag: str = "") -> dict:
    return {"ttft_p50_ms": p50, "ttft_p90_ms": p50, "ttft_p99_ms": p50, "tpot_p50_ms": 1.0, "output_tok_per_s": 1.0,
            "cache_hit_rate": 0.5, "load": load, "command": f"bench --seed 0 {tag}"}


def _doc(results: dict, runs: dict | None = None, scale: str = "gpu", gpu: str = "NVIDIA H200") -> dict:
    res = {system: {**cells, "runs": (runs or {}).get(system, [])} for system, cells in results.items()}
    return {"scale": scale, "config": "configs/gpu-routing.yaml", "scale_settings": {"workloads": WL},
            "machine": {"gpus": [gpu]},
            "systems": {"ray": {"routing": {"request_router_class": RAY}}, "kv-aware": {"routing": {}}},
            "results": res}


def test_each_cell_is_its_median_run_with_every_runs_p50():
    main = _doc({"kv-aware": {"docqa": {"sat": _cell(64.0, tag="main")}, "multiturn": {"sat": _cell(50.0)}}})
    a = _doc({"kv-aware": {"docqa": {"sat": _cell(90.0, tag="a")}}})
    b = _doc({"kv-aware": {"docqa": {"sat": _cell(85.0, tag="b")}}})
    cells = {c.workload: c for c in with_repeats(main, [("a.json", a), ("b.json", b)])}
    docqa = cells["docqa"]
    assert docqa.measured["ttft_p50_ms"] == 85.0 and docqa.measured["command"].endswith("b")  # a run, not a mean
    assert docqa.runs_ttft_p50_ms == (64.0, 90.0, 85.0)
    assert cells["multiturn"].runs_ttft_p50_ms == ()  # measured once: unchanged
    # an even count takes the lower middle run
    two = {c.workload: c for c in with_repeats(main, [("a.json", a)])}
    assert two["docqa"].measured["ttft_p50_ms"] == 64.0


def test_a_repeated_cell_the_main_result_lacks_is_not_added():
    main = _doc({"kv-aware": {"docqa": {"sat": _cell(64.0)}}})
    extra = _doc({"kv-aware": {"docqa": {"sat": _cell(70.0)}, "multiturn": {"sat": _cell(50.0)}}})
    assert [c.workload for c in with_repeats(main, [("x.json", extra)])] == ["docqa"]


def test_a_ray_copy_keeps_the_cells_its_own_run_measured_before_it():
    main = _doc({"ray": {"docqa": {"sat": _cell(60.0)}, "multiturn": {"sat": _cell(147.0)}}},
                runs={"ray": [{"cells": ["multiturn:sat", "docqa:sat"]}]})
    again = _doc({"ray": {"docqa": {"sat": _cell(61.0)}, "multiturn": {"sat": _cell(90.0)}}},
                 runs={"ray": [{"cells": ["docqa:sat", "multiturn:sat"]}]})
    third = _doc({"ray": {"multiturn": {"sat": _cell(100.0)}}}, runs={"ray": [{"cells": ["multiturn:sat"]}]})
    cells = {c.workload: c for c in with_repeats(main, [("again", again), ("third", third)])}
    assert cells["multiturn"].measured["ttft_p50_ms"] == 100.0 and cells["multiturn"].before == ()
    cells = {c.workload: c for c in with_repeats(main, [("again", again)])}  # 147, 90: the lower middle is 90
    mt = cells["multiturn"]
    assert mt.measured["ttft_p50_ms"] == 90.0
    assert [b.measured["ttft_p50_ms"] for b in mt.before] == [61.0]  # again's run measured docqa first


def test_a_copy_of_another_load_scale_or_gpu_is_an_error():
    main = _doc({"kv-aware": {"docqa": {"r70": _cell(42.0, {"mode": "rate", "rate": 24.716, "duration_s": 3})}}})
    other_rate = _doc({"kv-aware": {"docqa": {"r70": _cell(40.0, {"mode": "rate", "rate": 20.0, "duration_s": 3})}}})
    with pytest.raises(ValueError, match=r"other.json: kv-aware/docqa/r70 ran rate 20 .*rate 24.716"):
        with_repeats(main, [("other.json", other_rate)])
    cpu = _doc({"kv-aware": {"docqa": {"r70": _cell(40.0)}}}, scale="cpu")
    with pytest.raises(ValueError, match="cpu.json: scale 'cpu', the routing result's is 'gpu'"):
        with_repeats(main, [("cpu.json", cpu)])
    h100 = _doc({"kv-aware": {"docqa": {"r70": _cell(47.0)}}}, gpu="NVIDIA H100 80GB HBM3")
    with pytest.raises(ValueError, match=r"h100.json: ran on \['NVIDIA H100 80GB HBM3'\], the routing result on "
                                         r"\['NVIDIA H200'\]"):
        with_repeats(main, [("h100.json", h100)])


def test_the_residual_row_and_table_show_every_run():
    main = _doc({"kv-aware": {"docqa": {"sat": _cell(64.0)}}})
    cells = with_repeats(main, [("a", _doc({"kv-aware": {"docqa": {"sat": _cell(90.0)}}})),
                                ("b", _doc({"kv-aware": {"docqa": {"sat": _cell(85.0)}}}))])
    engine = EngineModel(prefill_tokens_per_s=50_000, step_s=0.005, kv_blocks=2048)
    (row,) = residuals(cells, engine, {"workloads": WL}, 4)
    assert row["gpu_ttft_p50_ms"] == 85.0 and row["gpu_runs_ttft_p50_ms"] == [64.0, 90.0, 85.0]
    assert "| 85 (runs 64, 90, 85) |" in residual_table([row])


def test_calibrate_refuses_another_gpus_repeats_with_a_precise_message(tmp_path, capsys):
    from benchmarks.simulator.calibrate import main

    results = Path(__file__).resolve().parents[2] / "benchmarks/results"
    h100 = results / "routing_h100_bf9a8ce_repeat_a2.json"
    with pytest.raises(SystemExit):
        main(["--overhead", str(results / "serving_overhead.json"), "--routing", str(results / "routing_h200.json"),
              "--routing-repeats", str(h100), "--out", str(tmp_path / "cal.json")])
    assert (f"--routing-repeats {h100}: ran on ['NVIDIA H100 80GB HBM3'], the routing result on ['NVIDIA H200']"
            in capsys.readouterr().err)
    assert not (tmp_path / "cal.json").exists()
