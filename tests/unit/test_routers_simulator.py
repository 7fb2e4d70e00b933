"""The simulator on tiny workloads: prefix-aware beats round-robin on shared prefixes, ties without."""

from __future__ import annotations

import json

import pytest

from benchmarks.simulator import workloads
from benchmarks.simulator.__main__ import main as sim_main
from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.load import Driver, LoadPlan
from benchmarks.simulator.sim import ClusterSpec, simulate
from serve_app.config.routing import RoutingConfig

pytestmark = pytest.mark.unit

ENGINE = EngineModel(prefill_tokens_per_s=10_000, step_s=0.01, kv_blocks=2048, block_size=16)


def _run(requests, strategy: str) -> dict:
    knobs = RoutingConfig(strategy=strategy, prefill_s_per_token=1e-4).knobs()
    driver = Driver(iter(workloads.trace_sessions(requests)), LoadPlan("trace"))
    return simulate(driver, knobs, ClusterSpec(4), ENGINE, seed=0).summary()


def test_prefix_aware_beats_round_robin_on_shared_prefix_load():
    reqs = workloads.shared_prefix(300, rate=12.0, docs=16, doc_tokens=4096, question_tokens=64, output_tokens=32)
    pa, rr = _run(reqs, "prefix-aware"), _run(reqs, "round-robin")
    assert pa["cache_hit_rate"] > rr["cache_hit_rate"] + 0.2
    assert pa["ttft_p50_ms"] < 0.5 * rr["ttft_p50_ms"]
    assert pa["output_tok_per_s"] >= rr["output_tok_per_s"]
    assert pa["requests"] == rr["requests"] == 300


def test_prefix_aware_ties_round_robin_without_sharing():
    reqs = workloads.no_sharing(300, rate=15.0, prompt_tokens=1024, output_tokens=32, poisson=False)
    pa, rr = _run(reqs, "prefix-aware"), _run(reqs, "round-robin")
    assert pa["cache_hit_rate"] == rr["cache_hit_rate"] == 0.0
    assert pa["ttft_p50_ms"] == pytest.approx(rr["ttft_p50_ms"], rel=0.05)
    assert pa["output_tok_per_s"] == pytest.approx(rr["output_tok_per_s"], rel=0.05)
    assert set(pa["reasons"]) == {"no-cache"}


def test_cli_writes_json(tmp_path):
    out = tmp_path / "sim.json"
    sim_main(["--workload", "multi-turn", "--replicas", "2", "--requests", "40", "--rate", "4",
              "--strategies", "prefix-aware,round-robin", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"prefix-aware", "round-robin"}
    assert doc["command"].startswith("python -m benchmarks.simulator")
    assert doc["git_commit"] and doc["machine"]["cpu_count"] >= 1  # a result names its code and machine


def test_mooncake_trace_replay_parses(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in [
        {"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]},
        {"timestamp": 500, "input_length": 600, "output_length": 5, "hash_ids": [0, 3]},
    ]))
    reqs = workloads.mooncake(trace, time_scale=0.5)
    assert [len(r.block_hashes) for r in reqs] == [2, 1]
    assert reqs[0].block_hashes[0] == reqs[1].block_hashes[0] and reqs[1].arrival == 0.25
