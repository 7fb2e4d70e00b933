"""The load generator's core in the simulator (``EngineModel.client_s_*``) and its fit from the client's
own CPU seconds (``benchmarks/simulator/client_fit.py``): a lone request is delayed by exactly the
client's work, every request still completes once, a costly client caps a closed loop at what one
core can do (``client_cores`` of them: more), whether a core shares itself among its requests or runs their work in
order (``client_sharing``); a core running it in order sends requests started together one after another; and the
fit recovers known costs (background, per request, per token), keeps them non-negative and counts a result once."""

from __future__ import annotations

import json

import pytest

from benchmarks.simulator import workloads
from benchmarks.simulator.client_fit import client_rows, fit_client
from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.load import Driver, LoadPlan
from benchmarks.simulator.sim import ClusterSpec, simulate
from serve_app.config.routing import RoutingConfig

pytestmark = pytest.mark.unit

ENGINE = EngineModel(prefill_tokens_per_s=20_000, step_s=0.005, kv_blocks=1024, block_size=16)
KNOBS = RoutingConfig(strategy="round-robin").knobs()


def _lone(engine: EngineModel, output_tokens: int = 8) -> dict:
    reqs = workloads.no_sharing(1, 1.0, prompt_tokens=512, output_tokens=output_tokens, poisson=False)
    plan = LoadPlan("trace", 0.0)
    return simulate(Driver(workloads.trace_sessions(reqs), plan), KNOBS, ClusterSpec(1),
                    engine).summary(per_replica=False)


def _closed(engine: EngineModel, replicas: int = 2) -> dict:
    plan = LoadPlan("concurrency", 32, duration_s=6.0)
    sessions = workloads.multiturn_sessions(sessions=64, turns=4, system_words=256, output_len=32, block_size=16)
    return simulate(Driver(sessions, plan), KNOBS, ClusterSpec(replicas), engine).summary(per_replica=False)


@pytest.mark.parametrize("client", ["ps", "fifo"])
@pytest.mark.parametrize("ingress", [{}, {"frontend_s_per_request": 0.003, "frontend_s_per_token": 0.0004},
                                     {"frontend_s_per_request": 0.003, "frontend_s_per_token": 0.0004,
                                      "frontend_sharing": "fifo"}])
def test_a_lone_request_waits_exactly_the_clients_work(ingress, client):
    base = ENGINE.with_(client_sharing=client, **ingress)
    free, costly = _lone(base), _lone(base.with_(client_s_per_request=0.002, client_s_per_token=0.0005))
    assert costly["requests"] == free["requests"] == 1
    assert costly["ttft_p50_ms"] == pytest.approx(free["ttft_p50_ms"] + 2.0 + 0.5, abs=1e-6)
    # the end: the request's work and every one of its 8 tokens, read in order after the engine's last
    assert costly["e2e_p50_ms"] == pytest.approx(free["e2e_p50_ms"] + 2.0 + 0.5, abs=0.5 * 8)
    assert costly["e2e_p50_ms"] >= free["e2e_p50_ms"] + 2.5 - 1e-6


def test_a_one_token_answer_is_counted_once():
    costly = _lone(ENGINE.with_(client_s_per_token=0.001), output_tokens=1)
    free = _lone(ENGINE, output_tokens=1)
    assert costly["requests"] == 1 and costly["ttft_p50_ms"] == pytest.approx(free["ttft_p50_ms"] + 1.0, abs=1e-6)


@pytest.mark.parametrize("client", ["ps", "fifo"])
def test_every_request_completes_once_through_a_costly_client(client):
    for ingress in ({}, {"frontend_s_per_request": 0.002, "frontend_s_per_token": 0.0002}):
        out = _closed(ENGINE.with_(client_s_per_request=0.003, client_s_per_token=0.0003, client_sharing=client,
                                   **ingress))
        assert out["requests"] == out["sent"] > 0 and out["retries"] == 0


@pytest.mark.parametrize("client", ["ps", "fifo"])
def test_a_costly_client_caps_a_closed_loop_at_one_core(client):
    free = _closed(ENGINE)
    costly = _closed(ENGINE.with_(client_s_per_request=0.004, client_s_per_token=0.0004, client_sharing=client))
    assert costly["ttft_p50_ms"] > free["ttft_p50_ms"] + 4.0 + 0.4
    assert costly["output_tok_per_s"] < free["output_tok_per_s"]
    per_s = costly["output_tok_per_s"] / 32  # 32 tokens per answer
    assert per_s * 0.004 + costly["output_tok_per_s"] * 0.0004 <= 1.02  # one core's worth of work per second


def test_client_cores_share_the_load_and_each_request_keeps_its_own_work():
    costs = {"client_s_per_request": 0.004, "client_s_per_token": 0.0004}
    one, four = _closed(ENGINE.with_(**costs)), _closed(ENGINE.with_(client_cores=4, **costs))
    assert four["requests"] == four["sent"] > 0 and four["retries"] == 0
    # four processes: no longer one core's worth of work per second, and the wait behind the others shrinks
    assert four["output_tok_per_s"] > one["output_tok_per_s"]
    assert four["output_tok_per_s"] / 32 * 0.004 + four["output_tok_per_s"] * 0.0004 > 1.02
    assert four["ttft_p50_ms"] < one["ttft_p50_ms"]
    # a lone request is delayed by exactly its own work, however many cores
    free, lone = _lone(ENGINE), _lone(ENGINE.with_(client_cores=4, **costs))
    assert lone["ttft_p50_ms"] == pytest.approx(free["ttft_p50_ms"] + 4.0 + 0.4, abs=1e-6)


def test_a_client_running_its_work_in_order_sends_a_burst_one_after_another():
    """Eight requests of one bench process at once: its loop sends them 4 ms apart, where a processor-sharing core
    finishes all eight sends together after 32 ms (each on an idle replica of its own)."""
    reqs = workloads.no_sharing(8, 1e6, prompt_tokens=64, output_tokens=1, poisson=False)

    def ttfts(**costs) -> list[float]:
        res = simulate(Driver(workloads.trace_sessions(reqs), LoadPlan("trace", 0.0)), KNOBS, ClusterSpec(8),
                       ENGINE.with_(step_s=1e-4, **costs))
        return sorted(t * 1e3 for t in res.ttft_s)

    free = ttfts()[0]
    fifo = ttfts(client_s_per_request=0.004, client_sharing="fifo")
    ps = ttfts(client_s_per_request=0.004, client_sharing="ps")
    assert fifo == pytest.approx([free + 4.0 * k for k in range(1, 9)], abs=0.05)
    assert ps == pytest.approx([free + 32.0] * 8, abs=0.05)


def test_kept_requests_are_the_measured_ones_shaped_as_bench_rows():
    reqs = workloads.no_sharing(6, 50.0, prompt_tokens=64, output_tokens=3, poisson=False)
    run = lambda keep: simulate(Driver(workloads.trace_sessions(reqs), LoadPlan("trace", 0.0)), KNOBS,
                                ClusterSpec(2), ENGINE, measure_from=2, keep_requests=keep)
    assert run(False).requests is None
    res = run(True)
    assert len(res.requests) == res.completed == 4
    assert sorted(r["ttft_s"] for r in res.requests) == pytest.approx(sorted(res.ttft_s))
    assert sorted(r["e2e_s"] for r in res.requests) == pytest.approx(sorted(res.e2e_s))
    assert {r["replica"] for r in res.requests} <= {"r0000", "r0001"} and all(r["ok"] for r in res.requests)
    assert all(r["ttft_s"] <= r["e2e_s"] for r in res.requests)


def test_client_costs_are_validated():
    with pytest.raises(ValueError):
        EngineModel(client_s_per_token=-1e-6)
    with pytest.raises(ValueError):
        EngineModel(client_cores=0)


def _row(cell: str, duration_s: float, requests: int, tokens: int, cpu_s: float) -> dict:
    return {"cell": cell, "duration_s": duration_s, "requests": requests, "output_tokens": tokens, "cpu_s": cpu_s,
            "cpu_util": 0.5}


def _cpu(duration_s: float, requests: int, tokens: int) -> float:
    return 0.1 * duration_s + 0.002 * requests + 1e-4 * tokens


def test_the_fit_recovers_known_costs():
    shapes = [(30.0, 1000, 64_000), (30.0, 500, 100_000), (20.0, 200, 10_000), (31.0, 170, 10_880)]
    fit = fit_client([_row(str(i), d, r, t, _cpu(d, r, t)) for i, (d, r, t) in enumerate(shapes)])
    assert fit["background"] == pytest.approx(0.1)
    assert fit["per_request_s"] == pytest.approx(0.002) and fit["per_token_s"] == pytest.approx(1e-4)
    # the simulated core is what the background leaves: its costs are over 1 - background
    assert (fit["client_s_per_request"] == pytest.approx(0.002 / 0.9)
            and fit["client_s_per_token"] == pytest.approx(1e-4 / 0.9))
    assert fit["max_abs_error_s"] == pytest.approx(0.0, abs=1e-3)
    # summed over four processes, the background is shared by their four cores
    four = fit_client([_row(str(i), d, r, t, _cpu(d, r, t)) for i, (d, r, t) in enumerate(shapes)], cores=4)
    assert four["client_s_per_request"] == pytest.approx(0.002 / (1 - 0.1 / 4))


def test_the_fit_keeps_costs_non_negative_and_refuses_what_it_cannot_separate():
    rows = [_row("a", 30.0, 1000, 64_000, 8.0), _row("b", 30.0, 100, 64_000, 10.0), _row("c", 20.0, 500, 20_000, 3.0)]
    fit = fit_client(rows)  # more requests, less CPU: no per-request cost
    assert fit["per_request_s"] == 0.0 and fit["per_token_s"] >= 0 and fit["background"] >= 0
    with pytest.raises(ValueError):
        fit_client(rows[:2])
    with pytest.raises(ValueError):  # every cell 30 s with 64-token answers: tokens are requests x 64
        fit_client([_row(str(r), 30.0, r, 64 * r, _cpu(30.0, r, 64 * r)) for r in (100, 200, 300)])


def test_rows_are_read_once_each(tmp_path):
    doc = {"summary": {"duration_s": 30.0, "requests": {"issued": 100, "warmup": 4}, "tokens": {"output_total": 6400},
                       "client": {"cpu_s": 1.5, "cpu_util": 0.05}}}
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "kv-aware-docqa-sat.json").write_text(json.dumps(doc))
    (tmp_path / "one" / "other.json").write_text(json.dumps({"summary": {"requests": {}}}))  # no client: skipped
    rows = client_rows([str(tmp_path / "one" / "kv-aware-docqa-sat.json"),
                        str(tmp_path / "two" / "kv-aware-docqa-sat.json"),
                        str(tmp_path / "one" / "other.json")])
    # the warm-up is not in the measured phase the CPU seconds cover
    assert rows == [{"cell": "kv-aware-docqa-sat", "duration_s": 30.0, "requests": 100, "output_tokens": 6400,
                     "cpu_s": 1.5, "cpu_util": 0.05}]
