"""Ray's router's decision trace (benchmarks/routing_h2h/ray_trace.py, written by ray_router.py with trace_dir) and
the paced fake engine in place of vLLM for the head-to-head on CPUs (systems.with_step_engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks.routing_h2h.ray_trace import read, summarise
from benchmarks.routing_h2h.systems import STEP_ENGINE, SYSTEMS, system_config, with_step_engine
from serve_app.config import load_app_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.unit


def _line(t: float, chosen: str, candidates=("a",), waiting: int = 0) -> dict:
    return {"t": t, "prompt_tokens": 700, "candidates": list(candidates), "queue": {}, "chosen": chosen,
            "waiting": waiting}


def test_a_wave_decided_while_others_wait_shows_as_one_replica_per_interval(tmp_path: Path) -> None:
    one = [_line(10.0, "a", ("a", "b")), *[_line(10.0 + i / 100, "b", ("b",), waiting=5 - i) for i in range(5)],
           _line(16.0, "c", ("c",)), _line(99.0, "a")]
    (tmp_path / "ray-router-1.jsonl").write_text("\n".join(json.dumps(x) for x in one) + "\n{cut short")
    (tmp_path / "ray-router-2.jsonl").write_text(json.dumps(_line(11.0, "a")) + "\n")
    s = summarise(read(tmp_path), 10.0, 20.0)
    assert s["decisions"] == 8  # the line at 99 s is another cell's; the cut line is skipped
    assert s["one_candidate_share"] == pytest.approx(7 / 8, abs=1e-3)
    assert s["decided_while_others_waited"] == 5
    assert s["same_replica_as_previous_while_waiting"] == pytest.approx(4 / 5)  # the first went from a to b
    assert s["longest_run_to_one_replica"] == 5
    assert s["replicas"] == ["a", "b", "c"] and s["by_interval"] == [[2, 5, 0], [0, 0, 1]]
    assert summarise(read(tmp_path), 50.0, 60.0) == {"decisions": 0}


def test_the_step_engine_replaces_vllm_and_keeps_the_configs_counts() -> None:
    base = yaml.safe_load((ROOT / "configs/gpu-routing.yaml").read_text())
    cfg = with_step_engine(base, 20.0)
    args = cfg["applications"][0]["args"]
    (m,) = args["models"]
    assert m["engine_class"] == STEP_ENGINE and m["engine_kwargs"] == {"step_ms": 20.0}
    assert m["deployment"]["num_replicas"] == base["applications"][0]["args"]["models"][0]["deployment"]["num_replicas"]
    for dep in (m["deployment"], args["ingress"]["deployment"]):
        assert "num_gpus" not in dep["ray_actor_options"] and dep["ray_actor_options"]["num_cpus"] == 0.1
    assert base["applications"][0]["args"]["models"][0]["engine_kwargs"]["load_format"] == "dummy"  # base untouched
    for system in SYSTEMS:
        load_app_config(system_config(cfg, system, {"num_gpu_blocks_override": 4096})["applications"][0]["args"])
