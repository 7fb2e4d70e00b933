"""The ingress's CPU costs from the GPU host's measure of each ingress loop (benchmarks/simulator/ingress_fit.py)."""

from __future__ import annotations

import pytest

from benchmarks.simulator import ingress_fit
from benchmarks.simulator.ingress_fit import fit_ingress, ingress_rows, tokenize_hold, tree_call_costs

pytestmark = pytest.mark.unit


def _cell(req_s: float, tok_s: float, loops: list[float], roles: str = "ingress") -> dict:
    procs = [{"pid": i, "role": roles, "cores": c + 0.1, "busiest_thread_cores": c} for i, c in enumerate(loops)]
    return {"ttft_p50_ms": 1.0, "requests_per_s": req_s, "output_tok_per_s": tok_s,
            "evidence": {"host_cpu": {"processes": procs + [{"pid": 99, "role": "replica", "cores": 3.0,
                                                              "busiest_thread_cores": 1.0}]}}}


def _loop(req_s: float, tok_s: float, ingresses: int = 2) -> float:
    return 0.1 + 0.007 * req_s / ingresses + 40e-6 * tok_s / ingresses  # a known ingress


def test_the_fit_recovers_a_known_ingress_from_its_loops_per_ingress():
    shapes = [(6.5, 416), (18, 1150), (25, 1600), (38, 2400), (60, 7800), (35, 7000), (77, 4900)]
    doc = {"results": {"kv-aware": {"ingress_replicas": 2, "docqa": {
        f"c{i}": _cell(r, t, [_loop(r, t)] * 2) for i, (r, t) in enumerate(shapes)}}}}
    rows = ingress_rows(doc)
    assert len(rows) == len(shapes) and all(r["ingresses"] == 2 for r in rows)
    assert rows[0]["requests_per_s"] == pytest.approx(6.5 / 2, abs=1e-3)  # each ingress carries half
    fit = fit_ingress(rows)
    assert fit["background"] == pytest.approx(0.1, abs=1e-3)
    assert fit["per_request_s"] == pytest.approx(0.007, rel=1e-3)
    assert fit["per_token_s"] == pytest.approx(40e-6, rel=1e-3)
    assert fit["frontend_s_per_request"] == pytest.approx(0.007 / 0.9, rel=1e-3)  # over what the background leaves
    assert fit["rms_error_cores"] < 1e-3


def test_cells_without_ingress_processes_or_rates_are_not_rows_and_too_few_rows_refuse():
    doc = {"results": {"rr": {"docqa": {"sat": _cell(10, 640, [0.2], roles="replica"),
                                        "r25": {"ttft_p50_ms": 1.0, "requests_per_s": 5.0, "output_tok_per_s": 300},
                                        "r70": _cell(0, 0, [0.2])},
                              "multiturn": {"sat": _cell(30, 3800, [0.5])}}}}
    rows = ingress_rows(doc)
    assert [r["cell"] for r in rows] == ["rr/multiturn/sat"] and rows[0]["ingresses"] == 1
    with pytest.raises(ValueError, match="at least 3"):
        fit_ingress(rows)


def _tree_doc(ms_of) -> dict:
    return {"command": "python -m benchmarks.routing_h2h.ray_tree_cost", "git_commit": "abc",
            "results": {wl: {"prompt_chars_mean": chars,
                             "actor": {"prefix_match": {"p50": ms_of(chars)}, "insert": {"p50": ms_of(chars)}}}
                        for wl, chars in (("docqa", 6000.0), ("multiturn", 1300.0), ("mooncake", 1600.0))}}


def test_the_tree_call_fit_recovers_a_fixed_and_a_per_token_cost():
    fit = tree_call_costs(_tree_doc(lambda chars: 0.8 + 0.1 * chars / 1e3))
    assert fit["tree_call_s"] == pytest.approx(0.0008, abs=1e-7)
    assert fit["tree_call_s_per_ktok"] == pytest.approx(0.0001, abs=1e-8)
    assert len(fit["rows"]) == 6 and fit["max_abs_error_ms"] < 1e-3 and fit["source"]["git_commit"] == "abc"


def test_the_tree_call_fit_needs_two_prompt_lengths_and_drops_a_negative_slope():
    with pytest.raises(ValueError, match="two prompt lengths"):
        tree_call_costs({"results": {"docqa": _tree_doc(lambda c: 1.0)["results"]["docqa"]}})
    fit = tree_call_costs(_tree_doc(lambda chars: 2.0 - 0.1 * chars / 1e3))  # longer prompts cheaper: no slope
    assert fit["tree_call_s_per_ktok"] == 0.0 and fit["tree_call_s"] > 0


def test_ray_reply_is_the_decision_weighted_routed_mean_less_the_twins_own_take():
    def cell(n, mean):
        return {"ttft_p50_ms": 1.0, "evidence": {"ray_router_ms": {"routed": {"n": n, "mean": mean, "p50": mean / 2}}}}

    doc = {"results": {"ray": {"runs": [], "docqa": {"sat": cell(300, 10.0)}, "multiturn": {"sat": cell(100, 30.0)}},
                       "kv-aware": {"docqa": {"sat": {"ttft_p50_ms": 1.0, "evidence": {}}}}}}
    got = ingress_fit.ray_reply(doc, taken_s=0.003)
    assert got["routed_mean_ms"] == 15.0 and got["ray_reply_s"] == 0.012  # (300*10 + 100*30) / 400 ms, less 3 ms
    assert [r["cell"] for r in got["rows"]] == ["ray/docqa/sat", "ray/multiturn/sat"]
    assert ingress_fit.ray_reply(doc, taken_s=0.5)["ray_reply_s"] == 0.0  # never negative
    with pytest.raises(ValueError, match="--ray-trace"):
        ingress_fit.ray_reply({"results": {"kv-aware": doc["results"]["kv-aware"]}}, taken_s=0.0)


def test_the_tokenize_hold_is_each_ingress_loops_tokenizer_time_per_request_it_carried():
    def profiled(req_s: float, shares: list[float]) -> dict:
        procs = [{"pid": i, "role": "ingress", "samples": 600, "threads": [
            {"thread": "thread (7): AsyncIO Thread: default", "top_self": [
                ["TokenizersBackend._encode_plus (transformers/tokenization_utils_tokenizers.py)", sh],
                ["RequestResponseCycle.send (http/httptools_impl.py)", 0.05]]}]} for i, sh in enumerate(shares)]
        procs.append({"pid": 9, "role": "replica", "samples": 300, "threads": []})
        return {"requests_per_s": req_s, "evidence": {"profile": {"seconds": 10.0, "rate_hz": 100, "processes": procs}}}

    # 600 samples in 10 s at 100 a second, 0.25 of them in the tokenizer: 0.15 of a core; 60 requests/s over two
    # ingresses: 30 each, so 5 ms per request; the other ingress 0.2: 4 ms; docqa (token ids) has no such cell
    doc = {"results": {"kv-aware": {"multiturn": {"sat": profiled(60.0, [0.25, 0.2])},
                                    "docqa": {"sat": profiled(60.0, [0.9, 0.9])}}}}
    hold = tokenize_hold(doc)
    assert [r["ms"] for r in hold["rows"]] == pytest.approx([5.0, 4.0])
    assert hold["tokenize_hold_s"] == pytest.approx(0.0045)
    with pytest.raises(ValueError, match="py-spy"):
        tokenize_hold({"results": {"kv-aware": {"docqa": {"sat": profiled(60.0, [0.3])}}}})
