"""The fake-engine cells in the simulator (``benchmarks/simulator/step_cells.py``): the engine's GPU parts become the
paced clock, every cell is compared, a result without a fake engine is refused with a clear message, and ``--gpu``
simulates a GPU result on the calibrated engine as it is; ``beside`` groups a cell's twin TTFTs by the replicas busy
at each send."""

from __future__ import annotations

import json

import pytest

from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.step_cells import compare, main, step_engine

pytestmark = pytest.mark.unit

CLS = "benchmarks.routing_h2h.ray_router:RayPrefixCacheAffinity"


def doc(step_ms: float | None = 7.0) -> dict:
    load = {"mode": "concurrency", "concurrency": 8, "duration_s": 3}
    cell = {"ttft_p50_ms": 20.0, "ttft_p90_ms": 30.0, "ttft_p99_ms": 40.0, "output_tok_per_s": 900.0, "load": load,
            "evidence": {"replicas": 4, "requests_by_replica": {"a": 5, "b": 9}}}
    wl = {"multiturn": ["--workload", "multiturn", "--sessions", "8", "--turns", "2", "--system-words", "64",
                        "--user-words", "8:16", "--output-len", "8"]}
    return {"step_engine_ms": step_ms, "scale_settings": {"workloads": wl},
            "systems": {"ray": {"routing": {"request_router_class": CLS}}, "kv-aware": {"routing": {}}},
            "results": {"ray": {"multiturn": {"sat": cell}}, "kv-aware": {"multiturn": {"sat": cell}}}}


def test_the_engine_becomes_the_fake_clock_and_keeps_the_serving_path():
    base = EngineModel(prefill_tokens_per_s=2e5, prefill_attn_s=5e-4, prefill_step_s=8e-3, step_s=2.7e-3,
                       decode_s_per_ktok=1.9e-5, gpu_contention=0.3, kv_admission=True, async_scheduling=True,
                       frontend_s_per_request=8e-3, replica_s_per_token=2e-5, tree_call_s=8e-4)
    eng = step_engine(base, 7.0)
    assert eng.step_time_s(decoding=64, context_tokens=100_000, prefill_s=0.0, busy_peers=3) == pytest.approx(0.007)
    assert eng.prefill_chunk_s(8192, 0) < 1e-6 and not eng.kv_admission and not eng.async_scheduling
    assert (eng.frontend_s_per_request, eng.replica_s_per_token, eng.tree_call_s) == (8e-3, 2e-5, 8e-4)
    with pytest.raises(ValueError, match="step_ms must be > 0"):
        step_engine(base, 0)


def test_every_cell_is_compared_and_ratios_are_over_kv_aware():
    out = compare(doc(), EngineModel(frontend_s_per_request=1e-3), seeds=2)
    assert {(r["system"], r["workload"]) for r in out["cells"]} == {("ray", "multiturn"), ("kv-aware", "multiturn")}
    for r in out["cells"]:
        assert r["measured_ttft_p50_ms"] == 20.0 and r["sim_ttft_p50_ms"] > 0
        assert r["measured_requests_by_replica"] == [9, 5]
        assert len(r["sim_requests_by_replica"]) == 2 and sum(r["sim_requests_by_replica"][0]) > 0
    (ratio,) = out["ratios"]
    assert ratio["system"] == "ray" and ratio["measured_ttft_p50_vs_kv_aware"] == 1.0


def test_beside_groups_each_cells_twin_ttfts_by_the_replicas_busy_at_each_send():
    out = compare(doc(None), EngineModel(frontend_s_per_request=1e-3), seeds=2, gpu=True, beside=True)
    for r in out["cells"]:
        b = r["sim_beside"]
        assert b["requests"] > 0 and sum(g["n"] for g in b["by_busy_others"].values()) == b["requests"]
        assert set(b["by_busy_others"]) <= {"0", "1", "2", "3"}  # four replicas: at most three others
        assert sum(g["n"] for g in b["by_same_replica"].values()) == b["requests"]
    assert "sim_beside" not in compare(doc(None), EngineModel(), seeds=1, gpu=True)["cells"][0]


def test_a_gpu_result_is_simulated_on_the_engine_as_it_is():
    slow = EngineModel(frontend_s_per_request=1e-3, prefill_tokens_per_s=1e3)  # a prompt costs ~0.1 s per 100 tokens
    gpu = compare(doc(None), slow, seeds=2, gpu=True)
    fake = compare(doc(7.0), slow, seeds=2)
    assert gpu["step_engine_ms"] is None and gpu["engine"]["prefill_tokens_per_s"] == 1e3
    for g, f in zip(gpu["cells"], fake["cells"]):
        assert len(g["sim_ttft_p50_ms_by_seed"]) == 2 and g["sim_ttft_p50_ms"] > f["sim_ttft_p50_ms"]
    with pytest.raises(ValueError, match="compare it without --gpu"):
        compare(doc(7.0), slow, gpu=True)


def test_a_result_without_the_fake_engine_is_refused(tmp_path, capsys):
    routing, engine = tmp_path / "r.json", tmp_path / "e.json"
    routing.write_text(json.dumps(doc(None)))
    engine.write_text(json.dumps({"routing": {"engine": {"step_s": 0.003}}}))
    assert main(["--routing", str(routing), "--engine", str(engine)]) == 2
    assert "not a --step-engine result" in capsys.readouterr().err


def test_a_cell_without_its_replica_count_is_refused(tmp_path, capsys):
    routing, engine = tmp_path / "r.json", tmp_path / "e.json"
    d = doc()
    del d["results"]["ray"]["multiturn"]["sat"]["evidence"]["replicas"]
    routing.write_text(json.dumps(d))
    engine.write_text(json.dumps({"routing": {"engine": {"step_s": 0.003}}}))
    assert main(["--routing", str(routing), "--engine", str(engine)]) == 2
    assert "records no replica count" in capsys.readouterr().err
