"""Calibration: the coordinate fit recovers a known engine from cells the simulator itself produced,
the closed-form serving fit recovers a known engine from the numbers it would have measured, kvserve's
stage split queues its ingress work per ingress, the committed H200 serving JSON is read and reproduced,
a routing JSON is read into cells, and the KV-tier cell's engine front end is fitted from its two floors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks.simulator.calibrate import fit_start, main
from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.routing_cells import (
    Cell,
    engine_parts_table,
    fit,
    gpu_cells,
    gpu_engine_stage_ms,
    ordering,
    residuals,
    simulate_cell,
)
from benchmarks.simulator.serving_cells import (
    attn_per_pair_s,
    fit_prefill_step,
    fit_serving,
    serving_cells,
    serving_residuals,
)
from benchmarks.simulator.tier_cell import fit_engine_floor, fit_tier_hit_s, tier_cell, tier_row

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
_DOCQA = ["--workload", "docqa", "--docs", "4", "--doc-tokens", "1024:2048", "--question-tokens", "32:64",
          "--output-len", "16"]
SETTINGS = {"workloads": {"docqa": _DOCQA, "no-sharing": [*_DOCQA, "--no-sharing"]}}
TRUE = EngineModel(prefill_tokens_per_s=40_000, step_s=0.004, decode_s_per_seq=1e-4, kv_blocks=512,
                   replicas_per_gpu=2, gpu_contention=0.2)


def _cells(strategy: str = "round-robin") -> list[Cell]:
    out = []
    # the no-sharing cell pins the prefill rate (docqa's prompts are mostly cached)
    for wl, load, mode, level in (("docqa", "sat", "concurrency", 16.0), ("docqa", "r70", "rate", 30.0),
                                  ("no-sharing", "r70", "rate", 30.0)):
        probe = Cell(strategy, wl, load, mode, level, 4.0, {})
        measured = simulate_cell(probe, TRUE, SETTINGS, 2)
        out.append(Cell(strategy, wl, load, mode, level, 4.0, measured))
    return out


def test_fit_recovers_the_engine_that_produced_the_cells():
    start = TRUE.with_(prefill_tokens_per_s=10_000, step_s=0.016)
    fitted, info = fit(_cells(), start, SETTINGS, 2, rounds=5, free=("prefill_tokens_per_s", "step_s"),
                       log=lambda m: None)
    assert info["loss"] < 0.01
    assert fitted.prefill_tokens_per_s == pytest.approx(40_000, rel=0.3)
    assert fitted.step_s == pytest.approx(0.004, rel=0.3)
    rows = residuals(_cells("prefix-aware"), fitted, SETTINGS, 2)
    assert all(abs(r["ttft_p50_error"]) < 0.25 for r in rows)


def test_residual_rows_set_the_gpu_engine_parts_beside_the_simulated_wait_and_prefill():
    cells = _cells()
    ev = {"stages_ms": {"engine": {"mean": 40.0}},
          "engine_parts_ms": {k: {"mean": v} for k, v in (("replica", 1.0), ("vllm_frontend", 15.0),
                                                          ("vllm_queue", 4.0), ("vllm_prefill", 20.0))}}
    cells[0] = dataclasses.replace(cells[0], measured={**cells[0].measured, "evidence": ev})
    rows = residuals(cells, TRUE.with_(input_s_per_request=0.005), SETTINGS, 2)
    sat, r70 = rows[0], rows[1]
    assert sat["sim_engine_input_mean_ms"] >= 5.0  # every request crosses the replica's front end (a FIFO)
    assert sat["gpu_engine_mean_ms"] == 40.0 and sat["gpu_engine_parts_mean_ms"]["vllm_frontend"] == 15.0
    # the simulator's engine stage is the replica's front end, its wait for a step and that step to the first token
    split = sat["sim_engine_input_mean_ms"] + sat["sim_engine_wait_mean_ms"] + sat["sim_engine_prefill_mean_ms"]
    assert sat["sim_engine_mean_ms"] == pytest.approx(split, abs=0.03)
    assert sat["sim_engine_prefill_mean_ms"] > 0
    assert r70["gpu_engine_parts_mean_ms"] is None and r70["gpu_engine_mean_ms"] is None
    table = engine_parts_table(rows).splitlines()
    assert len(table) == 3 and table[2].startswith("| docqa | sat | round-robin | 40.0 | 1.0/15.0/4.0/20.0 |")
    assert engine_parts_table(rows[1:]) == ""


def test_the_engine_stage_target_is_the_gpu_replicas_whole_stage_and_absent_without_stages():
    stages = {"engine": {"mean": 43.5, "p50": 30.0}, "dispatch": {"mean": 9.0}}
    assert gpu_engine_stage_ms({"evidence": {"stages_ms": stages}}) == 43.5
    assert gpu_engine_stage_ms({"evidence": {"stages_ms": {"dispatch": {"mean": 9.0}}}}) is None
    assert gpu_engine_stage_ms({"ttft_p50_ms": 1.0}) is None


def test_fit_start_sets_only_fitted_fields_and_refuses_anything_else():
    free = ("step_s", "prefill_step_s")
    assert fit_start(["prefill_step_s=0.008", "step_s=1.5e-3"], free) == {"prefill_step_s": 0.008, "step_s": 0.0015}
    for bad in ("kv_blocks=10", "step_s", "step_s=fast"):
        with pytest.raises(SystemExit, match="--start"):
            fit_start([bad], free)
    # --hold reads the same way and names itself
    assert fit_start(["step_s=0.002"], free, option="--hold") == {"step_s": 0.002}
    with pytest.raises(SystemExit, match="--hold 'kv_blocks=10'"):
        fit_start(["kv_blocks=10"], free, option="--hold")


def test_the_graph_step_surcharge_needs_a_graph_size_and_is_a_number_of_ms_or_fit(capsys):
    with pytest.raises(SystemExit):
        main(["--overhead", "absent.json", "--graph-step-ms", "fit"])
    assert "--graph-step-ms is the surcharge of a step within --graph-tokens" in capsys.readouterr().err
    for bad, why in (("fast", "argument --graph-step-ms: expected milliseconds or 'fit', not 'fast'"),
                     ("-1", "--graph-step-ms -1.0: a surcharge is >= 0 ms")):
        with pytest.raises(SystemExit):
            main(["--overhead", "absent.json", "--graph-tokens", "512", "--graph-step-ms", bad])
        assert why in capsys.readouterr().err


def test_ordering_compares_the_gpu_and_simulated_ranking():
    rows = [{"workload": "w", "load": "sat", "strategy": s, "gpu_ttft_p50_ms": g, "sim_ttft_p50_ms": m}
            for s, g, m in (("round-robin", 500, 400), ("prefix-aware", 200, 150), ("kv-aware", 150, 160))]
    o = ordering(rows)["w/sat"]
    assert o["gpu"] == ["kv-aware", "prefix-aware", "round-robin"]
    assert o["sim"] == ["prefix-aware", "kv-aware", "round-robin"]
    assert not o["same_best"] and not o["same_order"]
    # kv-aware and prefix-aware are 25% apart on the GPU and swapped in the sim; round-robin is apart from both, and
    # last in both
    assert (o["pairs_apart"], o["pairs_same_order"]) == (3, 2)
    tie = ordering([{**r, "gpu_ttft_p50_ms": 160 if r["strategy"] == "prefix-aware" else r["gpu_ttft_p50_ms"]}
                    for r in rows])["w/sat"]
    assert (tie["pairs_apart"], tie["pairs_same_order"]) == (2, 2)  # 150 vs 160 ms is a tie: not counted


def test_routing_json_is_read_into_the_modelled_cells():
    routing = json.loads((ROOT / "benchmarks/results/routing_h100.json").read_text())
    cells = gpu_cells(routing)
    # Ray's router by its twin (benchmarks/simulator/ray_twin.py)
    assert {c.strategy for c in cells} == {"round-robin", "prefix-aware", "kv-aware", "ray-prefix-cache-affinity"}
    assert {(c.workload, c.load, c.mode) for c in cells} >= {("docqa", "sat", "concurrency"),
                                                              ("multiturn", "r70", "rate")}
    with pytest.raises(ValueError, match="unknown EngineModel fields"):
        EngineModel.from_dict({**TRUE.to_dict(), "prefil_tokens_per_s": 1.0})


def test_routing_json_schema_2_is_read_per_system_with_its_strategy_and_ingresses():
    routing = json.loads((ROOT / "benchmarks/results/routing_h200_4b72041.json").read_text())
    assert routing["schema"] == "kvserve.routing_h2h/2"
    cells = gpu_cells(routing)
    names = {(c.name, c.strategy, c.ingresses) for c in cells}
    assert {("round-robin", "round-robin", 1), ("kv-aware", "kv-aware", 1), ("kv-aware-2ingress", "kv-aware", 2),
            ("round-robin+events", "round-robin", 1), ("prefix-aware", "prefix-aware", 1)} <= names
    assert ("ray-prefix-cache-affinity", "ray-prefix-cache-affinity", 1) in names  # by its twin
    workloads = {c.workload for c in cells}
    assert {"docqa", "multiturn", "no-sharing"} <= workloads and not workloads & {"runs", "routing", "ingress_replicas"}
    r70 = [c for c in cells if (c.name, c.workload, c.load) == ("kv-aware", "no-sharing", "r70")]
    assert (len(r70) == 1 and r70[0].mode == "rate"
            and r70[0].level == pytest.approx(routing["rates"]["no-sharing"]["r70"]))
    o = ordering([{"workload": "w", "load": "sat", "system": c.name, "strategy": c.strategy, "gpu_ttft_p50_ms": i,
                   "sim_ttft_p50_ms": -i} for i, c in enumerate(cells) if c.workload == "docqa"])["w/sat"]
    assert o["gpu"][:3] == ["round-robin", "kv-aware", "kv-aware-2ingress"] and o["sim"] == o["gpu"][::-1]


def test_no_sharing_docqa_twin_shares_no_document_between_questions():
    args = ["--workload", "docqa", "--docs", "2", "--doc-tokens", "1024:1024", "--no-sharing"]
    from benchmarks.simulator.routing_cells import sessions_for
    shared = sessions_for("docqa", [a for a in args if a != "--no-sharing"], 16)
    solo = sessions_for("no-sharing", args, 16)
    firsts = lambda src: [next(src).turns[0].block_hashes[0] for _ in range(8)]
    assert len(set(firsts(shared))) <= 2 and len(set(firsts(solo))) == 8


def test_tier_hit_cost_is_fitted_from_the_hit_alone_or_from_the_floors():
    engine = TRUE.with_(chunk_tokens=16384, kv_blocks=4096, tier_gbps=20.0, replicas_per_gpu=1, gpu_contention=0.0)
    bare = tier_cell(engine, 4096)["tier_hit_ms"]
    cost, how = fit_tier_hit_s(engine, {"prefix_tokens": 4096, "ttft_tier_hit_ms": bare + 45.0})
    assert cost == pytest.approx(0.045, abs=1e-4) and "hit alone" in how
    assert tier_cell(engine.with_(tier_hit_s=cost), 4096)["tier_hit_ms"] == pytest.approx(bare + 45.0, abs=0.1)
    cost, how = fit_tier_hit_s(engine, {"prefix_tokens": 4096, "ttft_tier_hit_ms": 100.0,
                                        "ttft_gpu_cache_hit_ms": 10.0, "load_ms": 50.0})
    assert cost == pytest.approx(0.040) and "floors" in how
    assert fit_tier_hit_s(engine, {"prefix_tokens": 4096, "ttft_tier_hit_ms": bare / 2})[0] == 0.0


def _serving_doc(e: EngineModel, L: int = 1024, O: int = 128, front_ms: float = 9.0, http_ms: float = 4.0,
                 stages_ms: dict | None = None) -> dict:
    """What serving_overhead.py would record for engine ``e``: vLLM's histograms and vllm bench's medians."""
    p1 = e.step_s + e.prefill_step_s + L / e.prefill_tokens_per_s + e.prefill_attn_s * L * (L / 2) / 1e6
    itl = lambda n: e.step_s + e.decode_s_per_ktok * n * (L + O / 2) / 1e3
    cmd = f"vllm bench serve --random-input-len {L} --random-output-len {O} --num-prompts {{n}}"
    def run(system, extra_ms):
        ttft = (p1 * 1e3 + front_ms + http_ms + extra_ms)
        level = lambda c, n: {"completed": n, "command": cmd.format(n=n), "median_ttft_ms": ttft * c,
                              "p90_ttft_ms": ttft * c, "median_tpot_ms": itl(c) * 1e3, "median_itl_ms": itl(c) * 1e3,
                              "output_throughput": c / itl(c),
                              "engine_ms": {"prefill": p1 * 1e3, "queue": 0.0, "ttft": p1 * 1e3 + front_ms}}
        return {"system": system, "c1": level(1, 30), "c64": level(64, 384)}
    runs = [run("vllm_serve", 0.0), run("vllm_serve", 0.0), run("kvserve", 4.0)]
    if stages_ms:
        runs[2]["c1"]["stages_ms"] = stages_ms
    return {"runs": runs}


def test_serving_fit_recovers_the_engine_behind_the_measurements():
    rate = 50_000.0
    true = EngineModel(prefill_tokens_per_s=rate, prefill_attn_s=attn_per_pair_s("llama-3.1-8b", rate), step_s=0.005,
                       decode_s_per_ktok=4e-5)
    fitted, inputs = fit_serving(_serving_doc(true), model_shape="llama-3.1-8b", base=EngineModel())
    assert fitted.prefill_tokens_per_s == pytest.approx(rate, rel=1e-3)
    assert fitted.prefill_attn_s == pytest.approx(true.prefill_attn_s, rel=1e-3)
    assert fitted.step_s == pytest.approx(0.005, rel=1e-6)
    assert fitted.decode_s_per_ktok == pytest.approx(4e-5, rel=1e-6)
    assert fitted.decode_s_per_seq == 0.0
    assert fitted.input_s_per_request == pytest.approx(0.009)
    assert inputs["request_overhead_s"] == pytest.approx({"vllm_serve": 0.004, "kvserve": 0.008})
    assert fitted.request_overhead_s == pytest.approx(0.008)  # the engine carries kvserve's overhead
    assert fitted.kv_bytes_per_token == 32 * 8 * 128 * 2 * 2
    assert inputs["stage_split"] == {}  # no stage histograms: kvserve runs with its unsplit overhead


def test_a_given_prefill_step_surcharge_comes_out_of_the_c1_prefill_before_its_speed():
    rate = 60_000.0
    true = EngineModel(prefill_tokens_per_s=rate, prefill_attn_s=attn_per_pair_s("llama-3.1-8b", rate), step_s=0.005,
                       decode_s_per_ktok=4e-5, prefill_step_s=0.004)
    doc = _serving_doc(true)
    fitted, inputs = fit_serving(doc, model_shape="llama-3.1-8b", base=EngineModel(), prefill_step_s=0.004)
    assert fitted.prefill_tokens_per_s == pytest.approx(rate, rel=1e-3) and fitted.prefill_step_s == 0.004
    assert inputs["prefill_step_ms"] == 4.0
    blind, _ = fit_serving(doc, model_shape="llama-3.1-8b", base=EngineModel())  # the surcharge read as prefill work
    assert blind.prefill_tokens_per_s < 0.9 * rate and blind.prefill_step_s == 0.0
    # both reproduce the c=1 prefill; the blind fit's 8K-token chunk is slower by what it took for per-token work
    assert (blind.prefill_chunk_s(1024, 0) + blind.prefill_step_s
            == pytest.approx(fitted.prefill_chunk_s(1024, 0) + fitted.prefill_step_s, rel=1e-6))
    assert blind.prefill_chunk_s(8192, 0) > fitted.prefill_chunk_s(8192, 0) + fitted.prefill_step_s
    with pytest.raises(ValueError, match="leaves nothing"):
        fit_serving(doc, model_shape="llama-3.1-8b", base=EngineModel(), prefill_step_s=1.0)


def test_the_prefill_step_surcharge_is_found_from_the_c64_tpot_and_throughput():
    rate = 60_000.0
    true = EngineModel(prefill_tokens_per_s=rate, prefill_attn_s=attn_per_pair_s("llama-3.1-8b", rate), step_s=0.005,
                       decode_s_per_ktok=4e-5, prefill_step_s=0.004, async_scheduling=True)
    doc = _serving_doc(true)
    engine, inputs = fit_serving(doc, model_shape="llama-3.1-8b", base=EngineModel(async_scheduling=True),
                                 prefill_step_s=0.004)
    measured = {r["system"]: r for r in serving_residuals(doc, engine, inputs["request_overhead_s"])
                if r["concurrency"] == 64}
    for run in doc["runs"]:  # the "GPU" at c=64 is the true engine: its TPOT and throughput carry the mixed steps
        run["c64"]["median_tpot_ms"] = measured[run["system"]]["sim_tpot_p50_ms"]
        run["c64"]["output_throughput"] = measured[run["system"]]["sim_output_tok_per_s"]
    step, rows, (fitted, fit_inputs) = fit_prefill_step(doc, model_shape="llama-3.1-8b",
                                                        base=EngineModel(async_scheduling=True))
    assert step == pytest.approx(0.004)
    assert fitted.prefill_step_s == pytest.approx(0.004) and fit_inputs["prefill_step_ms"] == pytest.approx(4.0)
    assert min(rows, key=lambda r: r["loss"])["prefill_step_ms"] == 4.0 and rows[0]["loss"] > rows[8]["loss"]


def test_kvserve_stage_split_puts_ingress_work_in_a_queue_per_ingress_and_the_rest_in_fixed_latency():
    true = EngineModel(prefill_tokens_per_s=50_000.0, step_s=0.005, decode_s_per_ktok=4e-5)
    stages = {"tokenize": 6.0, "hash": 0.5, "dispatch": 2.5, "engine": 30.0, "return": 1.0, "first_byte": 0.5}
    doc = _serving_doc(true, stages_ms=stages)
    engine, inputs = fit_serving(doc, model_shape="llama-3.1-8b", base=EngineModel(), ingresses=2)
    split = inputs["stage_split"]["kvserve"]
    assert split["ingresses"] == 2 and split["input_s_per_request"] == 0.0
    assert split["frontend_s_per_request"] == pytest.approx(0.0065)
    # client TTFT at c=1 = prefill + 9 (front) + 4 (http) + 4 (kvserve's extra) ms; the ingress takes 6.5 of it
    assert split["request_overhead_s"] == pytest.approx(0.009 + 0.004 + 0.004 - 0.0065, abs=1e-6)
    assert engine.frontend_s_per_request == 0.0  # the engine written keeps the unsplit form
    rows = {(r["system"], r["concurrency"]): r
            for r in serving_residuals(doc, engine, inputs["request_overhead_s"], inputs["stage_split"])}
    assert rows["kvserve", 1]["stage_split"] and not rows["vllm_serve", 1]["stage_split"]
    assert abs(rows["kvserve", 1]["ttft_p50_ms_error"]) < 0.01  # still matched by construction at c=1
    # at c=64 the wave of arrivals queues behind 2 ingresses of 6.5 ms, not one engine front end of 9 ms
    unsplit = {(r["system"], r["concurrency"]): r for r in serving_residuals(doc, engine, inputs["request_overhead_s"])}
    assert rows["kvserve", 64]["sim_ttft_p50_ms"] < unsplit["kvserve", 64]["sim_ttft_p50_ms"]


def test_committed_h200_json_is_fitted_and_its_c1_cells_reproduced():
    doc = json.loads((ROOT / "benchmarks/results/serving_overhead.json").read_text())
    assert doc["machine"]["gpu"] == "NVIDIA H200"
    cells = {(c.system, c.concurrency): c for c in serving_cells(doc)}
    assert {("vllm_serve", 1), ("vllm_serve", 64), ("kvserve", 1), ("kvserve", 64)} <= set(cells)
    assert cells["vllm_serve", 64].prompts == 384 and cells["vllm_serve", 1].runs == 2
    engine, inputs = fit_serving(doc, model_shape="llama-3.1-8b", base=EngineModel(chunk_tokens=8192))
    assert 0 < engine.step_s < inputs["itl_p50_ms_c1"] / 1e3
    assert all(0 < v < 0.05 for v in inputs["request_overhead_s"].values())
    split = inputs["stage_split"]["kvserve"]
    assert split["runs"] == 2 and 0 < split["frontend_s_per_request"] < split["request_overhead_s"] + 0.01
    rows = {(r["system"], r["concurrency"]): r
            for r in serving_residuals(doc, engine, inputs["request_overhead_s"], inputs["stage_split"])}
    assert abs(rows["vllm_serve", 1]["ttft_p50_ms_error"]) < 0.01  # by construction
    assert abs(rows["kvserve", 1]["ttft_p50_ms_error"]) < 0.01
    assert abs(rows["vllm_serve", 64]["output_tok_per_s_error"]) < 0.1
    assert all(abs(rows[s, 64]["ttft_p50_ms_error"]) <= 0.25 for s in ("vllm_serve", "kvserve"))


def test_tier_cell_charges_the_load_then_the_suffix_and_a_recompute_the_whole_prompt():
    engine = TRUE.with_(chunk_tokens=16384, kv_blocks=4096, tier_gbps=10.0, request_overhead_s=0.5,
                        input_s_per_request=0.5, replicas_per_gpu=1, gpu_contention=0.0)
    cell = tier_cell(engine, 4096, suffix_tokens=32)
    assert cell["tier_tokens"] == 4096
    hit = engine.tier_load_s(4096) + engine.step_s + engine.prefill_chunk_s(32, 4096)
    assert cell["tier_hit_ms"] == pytest.approx(hit * 1e3, abs=0.1)  # no front end, no overhead: in-process timing
    assert cell["recompute_ms"] == pytest.approx((engine.step_s + engine.prefill_chunk_s(4128, 0)) * 1e3, abs=0.1)
    row = tier_row(engine, prefix_tokens=4096, recompute_ms=cell["recompute_ms"] * 2, tier_hit_ms=cell["tier_hit_ms"],
                   source="test")
    assert (row["recompute_error"], row["tier_hit_error"]) == (pytest.approx(-0.5, abs=1e-3), 0.0)


def test_tier_cell_charges_the_engine_front_end_to_every_request_by_prompt_length():
    engine = TRUE.with_(chunk_tokens=8192, kv_blocks=4096, tier_gbps=10.0, tier_hit_s=0.01, replicas_per_gpu=1,
                        gpu_contention=0.0)
    fixed, per_ktok = 0.008, 0.0011
    front = lambda tokens: fixed + per_ktok * tokens / 1e3
    cell = tier_cell(engine, 4096, floor=(fixed, per_ktok))
    gpu_hit = front(4128) + engine.step_s + engine.prefill_chunk_s(32, 4096)
    assert cell["gpu_cache_hit_ms"] == pytest.approx(gpu_hit * 1e3, abs=0.1)
    assert cell["short_prompt_ms"] == pytest.approx((front(32) + engine.step_s + engine.prefill_chunk_s(32, 0)) * 1e3,
                                                    abs=0.1)
    # a tier hit is the GPU-cache hit plus the copy and the fixed cost of a hit
    hit = gpu_hit + engine.tier_load_s(4096) + engine.tier_hit_s
    assert cell["tier_hit_ms"] == pytest.approx(hit * 1e3, abs=0.1)
    # the LLM class's 16K budget prefills the recomputed prompt in one step
    assert cell["recompute_ms"] == pytest.approx((front(4128) + engine.step_s + engine.prefill_chunk_s(4128, 0)) * 1e3,
                                                 abs=0.1)
    two_steps = tier_cell(engine, 4096, floor=(fixed, per_ktok), chunk_tokens=4096)["recompute_ms"]
    assert two_steps > cell["recompute_ms"] + engine.step_s * 1e3 - 0.2


def test_engine_floor_is_recovered_from_the_two_floors_and_absent_without_them():
    engine = TRUE.with_(kv_blocks=4096, replicas_per_gpu=1, gpu_contention=0.0)
    cell = tier_cell(engine, 8192, floor=(0.008, 0.0011))
    tier = {"prefix_tokens": 8192, "ttft_short_prompt_ms": cell["short_prompt_ms"],
            "ttft_gpu_cache_hit_ms": cell["gpu_cache_hit_ms"]}
    fixed, per_ktok, how = fit_engine_floor(engine, tier)
    assert fixed == pytest.approx(0.008, abs=2e-4) and per_ktok == pytest.approx(0.0011, abs=3e-5)
    assert "line through the two" in how
    assert fit_engine_floor(engine, {"prefix_tokens": 8192, "ttft_short_prompt_ms": 10.0}) is None
    # never negative: a GPU-cache hit measured faster than the short prompt gives no per-token part
    fixed, per_ktok, _ = fit_engine_floor(engine, {**tier, "ttft_gpu_cache_hit_ms": 1.0})
    assert per_ktok == 0.0 and fixed >= 0.0


def test_input_cost_grows_with_the_prompt_and_is_never_negative():
    engine = EngineModel(input_s_per_request=0.008, input_s_per_ktok=0.001)
    assert engine.input_s(2000) == pytest.approx(0.010)
    with pytest.raises(ValueError):
        EngineModel(input_s_per_ktok=-1e-3)


def test_twin_replays_the_gpu_cells_own_prompts():
    """A cell's twin sessions use the seed its bench command gave the prompts (salted by the load level), so the
    docqa twin's prompt lengths are the bench's, question by question; another seed gives other prompts."""
    from itertools import islice

    from benchmarks.bench.workloads.docqa import DocQAWorkload
    from benchmarks.simulator.routing_cells import sessions_for

    command = "python -m benchmarks.cli bench --workload docqa --concurrency 64 --processes 4 --duration 30"
    cell = Cell("kv-aware", "docqa", "sat", "concurrency", 64.0, 30.0, {"command": command})
    assert cell.prompt_seed == "0/c64"
    assert Cell("kv-aware", "docqa", "r70", "rate", 24.716, 30.0, {"command": command}).prompt_seed == "0/r24.716"
    salted = {"command": command + " --seed 3 --prompt-salt x"}
    assert Cell("kv-aware", "docqa", "sat", "concurrency", 64.0, 30.0, salted).prompt_seed == "3/x"

    args = ["--workload", "docqa", "--docs", "24", "--doc-tokens", "4096:8192", "--question-tokens", "32:64"]
    bench = DocQAWorkload(num_docs=24, doc_tokens=(4096, 8192), question_tokens=(32, 64), api="completions",
                          seed=cell.prompt_seed)
    sent = [s.next_request(None).input_tokens for s in islice(bench.sessions(), 32)]
    twin = lambda seed: [s.turns[0].prompt_tokens for s in islice(sessions_for("docqa", args, 16, seed), 32)]
    assert twin(cell.prompt_seed) == sent
    assert twin(0) != sent
