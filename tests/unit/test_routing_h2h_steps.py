"""vLLM's iteration log read into engine steps (benchmarks/routing_h2h/steps.py), and the harness's ``--steps``:
the engines log every step, each cell's evidence gets the steps of its own seconds, and such a run never merges into
another result."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from benchmarks.routing_h2h import run
from benchmarks.routing_h2h import steps as steps_mod
from benchmarks.routing_h2h.steps import Step, collect, main, parse, summarise

ROOT = Path(__file__).resolve().parents[2]

LINES = [
    ("INFO 12-05 13:07:45 [loggers.py:182] Engine 000: Iteration(7): 1 context requests, 35 context tokens, "
    "0 generation requests, 0 generation tokens, iteration elapsed time: 30.50 ms, GPU KV cache usage: 0.6%"),
    ("(ServeReplica pid=1) INFO 12-05 13:07:46 [loggers.py:182] Engine 000: Iteration(8): 0 context requests, "
    "0 context tokens, 16 generation requests, 16 generation tokens, iteration elapsed time: 5.25 ms, GPU KV cache "
    "usage: 10.0%"),
    ("INFO 12-05 13:07:47 [loggers.py:182] Engine 000: Iteration(9): 2 context requests, 900 context tokens, "
    "14 generation requests, 14 generation tokens, iteration elapsed time: 12.00 ms, GPU KV cache usage: 11.0%"),
    ("INFO 12-05 13:07:48 [loggers.py:182] Engine 000: Iteration(10): 0 context requests, 0 context tokens, "
    "0 generation requests, 0 generation tokens, iteration elapsed time: 0.00 ms (dummy), GPU KV cache usage: 0.0%"),
    "INFO 12-05 13:07:48 [core.py:1] something else entirely",
]


def test_iteration_lines_become_steps_and_other_lines_are_skipped():
    steps = parse(LINES, "w1")
    assert [s.index for s in steps] == [7, 8, 9]  # the dummy step and the unrelated line are not steps
    assert [s.prefill for s in steps] == [True, False, True]
    assert (steps[2].ctx_reqs, steps[2].ctx_tokens, steps[2].gen_reqs, steps[2].elapsed_ms) == (2, 900, 14, 12.0)
    assert steps[1].clock == "13:07:46" and steps[1].source == "w1"


def test_summary_splits_the_wait_by_kind_of_step_within_the_window():
    steps = parse(LINES, "w1")
    doc = summarise(steps)
    assert doc["steps"] == 3 and doc["prefill_share"] == round(2 / 3, 4)
    assert doc["wait_ms"]["prefill"]["n"] == 2 and doc["wait_ms"]["prefill"]["mean"] == 21.25
    assert doc["wait_ms"]["decode"] == {"n": 1, "mean": 5.25, "p10": 5.25, "p50": 5.25, "p90": 5.25, "p99": 5.25}
    assert doc["prefill_ctx_tokens"]["mean"] == 467.5
    # by scheduled tokens against the CUDA-graph size: 35 tokens fit 512, 900 + 14 do not
    assert steps[2].tokens == 914 and doc["graph_tokens"] == 512
    assert doc["wait_ms"]["prefill_in_graph"]["mean"] == 30.5 and doc["wait_ms"]["prefill_in_graph"]["n"] == 1
    assert doc["wait_ms"]["prefill_over_graph"]["mean"] == 12.0 and doc["wait_ms"]["prefill_over_graph"]["n"] == 1
    assert summarise(steps, graph_tokens=1024)["wait_ms"]["prefill_over_graph"] == {"n": 0}
    windowed = summarise(steps, "13:07:46", "13:07:46")
    assert windowed["steps"] == 1 and windowed["wait_ms"]["prefill"] == {"n": 0}


def test_cli_refuses_logs_without_iteration_lines(tmp_path, capsys):
    log = tmp_path / "worker-1.out"
    log.write_text("INFO nothing here\n")
    assert main([str(log)]) == 1
    assert "enable_logging_iteration_details" in capsys.readouterr().err
    log.write_text("\n".join(LINES) + "\n")
    out = tmp_path / "steps.json"
    assert main([str(log), "--out", str(out)]) == 0 and '"prefill_share"' in out.read_text()
    assert main([str(log), "--graph-tokens", "1024", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["wait_ms"]["prefill_in_graph"]["n"] == 2
    with pytest.raises(SystemExit):
        main([str(log), "--graph-tokens", "-1"])
    assert "--graph-tokens must be >= 0, got -1" in capsys.readouterr().err


def test_collect_keeps_every_workers_iteration_lines_in_one_gzip(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "worker-a.out").write_text("\n".join(LINES[:2]) + "\n")
    (logs / "worker-b.out").write_text("\n".join(LINES[2:]) + "\n")
    (logs / "worker-c.out").write_text("INFO no steps here\n")
    (logs / "raylet.out").write_text(LINES[0] + "\n")  # not a worker's log
    dest = tmp_path / "steps.log.gz"
    steps = collect(logs, dest)
    assert [(s.source, s.index) for s in steps] == [("worker-a.out", 7), ("worker-a.out", 8), ("worker-b.out", 9)]
    with gzip.open(dest, "rt") as f:
        kept = f.read().splitlines()
    assert len(kept) == 4 and kept[0].startswith("worker-a.out: ")  # the dummy step's line is kept as written
    assert parse(kept, "all") == [Step("all", s.clock, s.index, s.ctx_reqs, s.ctx_tokens, s.gen_reqs, s.elapsed_ms,
                                       s.gen_tokens) for s in steps]
    assert collect(tmp_path / "none", tmp_path / "none.gz") == [] and not (tmp_path / "none.gz").exists()


def _fake_server(monkeypatch, logs):
    """run_system's server, probe and bench replaced: each cell takes two 'seconds' of the fake clock."""
    ticks = iter(["13:07:45", "13:07:46", "13:07:47", "13:07:48"])
    monkeypatch.setattr(steps_mod, "clock", lambda: next(ticks))
    monkeypatch.setattr(steps_mod, "RAY_LOGS", logs)
    for name in ("start", "wait_ready", "wait_app_running", "wait_serving", "stop"):
        monkeypatch.setattr(run.serverproc, name, lambda *a, **k: None)
    monkeypatch.setattr(run.serverproc, "deployment_name", lambda model: "d")
    monkeypatch.setattr(run.evidence, "Probe", lambda *a: SimpleNamespace(url="u", error=None, start=lambda: None,
                                                                        finish=lambda: {"requests_per_replica": {}}))
    monkeypatch.setattr(run, "run_cell", lambda name, wl, level, *a: {"ttft_p50_ms": 1.0})


def test_steps_summarise_each_cell_over_its_own_seconds(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "worker-a.out").write_text("\n".join(LINES) + "\n")
    _fake_server(monkeypatch, logs)
    base = yaml.safe_load((ROOT / "configs/gpu-routing.yaml").read_text())
    cfg = run.system_config(base, "kv-aware", {})
    args = run.parser().parse_args(["--steps", "--work-dir", str(tmp_path / "w"), "--scale", "gpu"])
    (tmp_path / "w").mkdir()
    saved = []
    out = run.run_system("kv-aware", cfg, run.SCALES["gpu"], [("docqa", "sat"), ("multiturn", "sat")], {}, args,
                         saved.append)
    first, second = out["docqa"]["sat"]["evidence"]["steps"], out["multiturn"]["sat"]["evidence"]["steps"]
    assert first["window"] == ["13:07:45", "13:07:46"] and first["steps"] == 2  # Iteration 7 and 8
    assert second["window"] == ["13:07:47", "13:07:48"] and second["steps"] == 1  # 9; the dummy is no step
    assert "requests_per_replica" in out["docqa"]["sat"]["evidence"]  # the probe's evidence is kept beside
    assert saved[-1] is out and (tmp_path / "w" / "kv-aware_steps.log.gz").exists()


@pytest.mark.parametrize("flags", [["--steps", "--fast-path"], ["--fast-path"]])
def test_steps_keep_the_replicas_stdout_in_the_worker_logs_under_the_fast_path(tmp_path, monkeypatch, flags):
    # RAY_SERVE_THROUGHPUT_OPTIMIZED alone sends a replica's stdout (vLLM's iteration lines) to Serve's buffered
    # replica log, where collect() does not look: --steps starts Serve with RAY_SERVE_LOG_TO_STDERR=1
    _fake_server(monkeypatch, tmp_path / "no-logs")
    envs = []
    monkeypatch.setattr(run.serverproc, "start", lambda cmd, env, *a, **k: envs.append(env))
    base = yaml.safe_load((ROOT / "configs/gpu-routing.yaml").read_text())
    args = run.parser().parse_args([*flags, "--work-dir", str(tmp_path / "w"), "--scale", "gpu"])
    (tmp_path / "w").mkdir()
    run.run_system("kv-aware", run.system_config(base, "kv-aware", {}), run.SCALES["gpu"], [("docqa", "sat")], {},
                   args, lambda doc: None)
    assert envs[0]["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert envs[0].get("RAY_SERVE_LOG_TO_STDERR") == ("1" if "--steps" in flags else None)


def test_steps_run_the_engines_with_the_iteration_log_and_refuse_merge(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(run, "run_system",
                        lambda name, cfg, scale, cells, doc, args, save: seen.append(cfg) or {"runs": []})
    common = ["--config", "configs/gpu-routing.yaml", "--scale", "gpu", "--out", str(tmp_path / "r.json"),
              "--work-dir", str(tmp_path / "w"), "--systems", "round-robin", "--workloads", "docqa", "--loads", "sat"]
    with pytest.raises(SystemExit):
        run.main([*common, "--steps", "--merge"])
    assert run.main([*common, "--steps"]) == 0
    models = seen[0]["applications"][0]["args"]["models"]
    assert all(m["engine_kwargs"]["enable_logging_iteration_details"] is True for m in models)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["scale_settings"]["engine_kwargs"]["enable_logging_iteration_details"] is True


def test_a_run_cut_short_records_the_cells_it_finished(tmp_path, monkeypatch):
    _fake_server(monkeypatch, tmp_path / "no-logs")

    def cell(name, wl, level, *a):
        if wl == "multiturn":
            raise TimeoutError("the call's limit")
        return {"ttft_p50_ms": 1.0}

    monkeypatch.setattr(run, "run_cell", cell)
    base = yaml.safe_load((ROOT / "configs/gpu-routing.yaml").read_text())
    args = run.parser().parse_args(["--work-dir", str(tmp_path / "w"), "--scale", "gpu"])
    (tmp_path / "w").mkdir()
    out = run.run_system("kv-aware", run.system_config(base, "kv-aware", {}), run.SCALES["gpu"],
                         [("docqa", "sat"), ("multiturn", "sat")], {}, args, lambda out: None)
    (record,) = out["runs"]
    assert record["cells"] == ["docqa:sat", "multiturn:sat"] and record["done"] == ["docqa:sat"]
    assert "multiturn" not in out and record["error"].startswith("TimeoutError")
