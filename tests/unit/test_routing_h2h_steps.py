"""vLLM's iteration log read into engine steps (benchmarks/routing_h2h/steps.py)."""

from __future__ import annotations

from benchmarks.routing_h2h.steps import main, parse, summarise

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
