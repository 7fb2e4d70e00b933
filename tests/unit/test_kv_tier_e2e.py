"""benchmarks/gpu/kv_tier_e2e.py's pieces that need no server: load flags (closed vs open loop), the kill
time, the router's KV evidence, the run's evidence from two canned scrapes (kv_tier_evidence.py), and the
midway kill recording its failure instead of losing it."""

from __future__ import annotations

import json
import threading
import time

import pytest

from benchmarks import serverproc
from benchmarks.gpu import kv_tier_e2e as e2e
from benchmarks.gpu import kv_tier_evidence
from benchmarks.gpu.promtext import parse

pytestmark = pytest.mark.unit


def test_gpu_scale_is_closed_loop_cpu_scale_open_loop() -> None:
    assert e2e.load_args(e2e.SCALES["gpu"]) == (["--concurrency", "64", "--num-requests", "2000"], 120.0)
    assert e2e.load_args(e2e.SCALES["cpu"]) == (["--rate", "0.5"], 60.0)
    assert e2e.load_args({"load": "concurrency", "concurrency": 8, "num_requests": None, "duration_s": 30.0}) \
        == (["--concurrency", "8"], 30.0)
    assert e2e.kill_at_s(e2e.SCALES["gpu"]) == 35.0
    assert e2e.kill_at_s(e2e.SCALES["cpu"]) == 30.0


def test_router_kv_evidence() -> None:
    ev = e2e.router_kv_evidence({"router_kv_events_total": 422880.0, "router_predicted_cached_tokens_total": 200.0,
                                 "router_actual_cached_tokens_total": 150.0,
                                 "router_cached_tokens_prediction_error_tokens_sum": 30.0,
                                 "router_cached_tokens_prediction_error_tokens_count": 3.0})
    assert ev == {"router_kv_events_total": 422880.0, "router_predicted_cached_tokens_total": 200.0,
                  "router_actual_cached_tokens_total": 150.0, "actual_over_predicted": 0.75,
                  "prediction_error_mean_tokens": 10.0}
    assert e2e.router_kv_evidence({})["actual_over_predicted"] is None


def test_restart_midway_records_why_it_did_not_kill(monkeypatch) -> None:
    monkeypatch.setattr(serverproc, "replica_actors", lambda dep: [])
    rec: dict = {}
    e2e.restart_midway("vllm-llama-3-2-1b", 0.01, 4, time.monotonic(), rec, threading.Event())
    assert rec["error"].startswith("RuntimeError: no alive actor") and "killed" not in rec

    def broken(dep):
        raise ConnectionError("dashboard unreachable")

    monkeypatch.setattr(serverproc, "replica_actors", broken)
    rec = {}
    e2e.restart_midway("d", 0.01, 4, time.monotonic(), rec, threading.Event())
    assert rec["error"] == "ConnectionError: dashboard unreachable"
    done = threading.Event()
    done.set()
    rec = {}
    e2e.restart_midway("d", 5.0, 4, time.monotonic(), rec, done)
    assert rec["error"].startswith("not killed: the bench ended")


def test_cli_load_overrides(monkeypatch, tmp_path) -> None:
    seen = {}

    def fake_scale(args_list):
        monkeypatch.setattr(e2e, "run_system", lambda system, run, cfg, scale, args, work, log: seen.update(scale)
                            or {"system": system, "run": run})
        monkeypatch.setattr(e2e, "kv_bytes_per_token", lambda model_dir, dtype: 32768)
        e2e.main(["--scale", "gpu", "--order", "tier_off", "--out", str(tmp_path / "o.json"), *args_list])
        return dict(seen)

    assert fake_scale([])["load"] == "concurrency"
    s = fake_scale(["--rate", "30"])
    assert (s["load"], s["rate"]) == ("rate", 30.0)
    s = fake_scale(["--concurrency", "32", "--num-requests", "500", "--duration", "100"])
    assert (s["load"], s["concurrency"], s["num_requests"], s["duration_s"]) == ("concurrency", 32, 500, 100.0)
    with pytest.raises(SystemExit):
        fake_scale(["--rate", "3", "--concurrency", "4"])
    assert fake_scale([])["tier"]["load_mode"] == "async"
    assert fake_scale(["--load-mode", "sync"])["tier"]["load_mode"] == "sync"
    assert json.loads((tmp_path / "o.json").read_text())["load_mode"] == "sync"
    with pytest.raises(SystemExit):
        fake_scale(["--load-mode", "lazy"])


def test_append_continues_an_earlier_invocation_only_with_the_same_settings() -> None:
    prev = {"scale_settings": {"docs": 48}, "sizes": {"a": 1}, "git_commit": "abc", "command": "first",
            "runs": [{"system": "tier_off", "run": 1}], "leftovers": []}
    doc = {"scale_settings": {"docs": 48}, "sizes": {"a": 1}, "git_commit": "abc", "command": "second",
           "runs": [], "leftovers": []}
    assert e2e.append_to(doc, prev) is None
    assert doc["runs"] == [{"system": "tier_off", "run": 1}] and doc["commands"] == ["first", "second"]
    # the next tier_off run of this invocation is numbered after the earlier one
    assert sum(r["system"] == "tier_off" for r in doc["runs"]) + 1 == 2
    other = dict(doc, git_commit="def", runs=[])
    assert "git_commit" in e2e.append_to(other, prev) and other["runs"] == []


def test_gpu_scale_runs_two_ingress_replicas_with_tier_only_differing() -> None:
    import yaml

    from benchmarks.gpu.kv_tier_e2e import ROOT
    base = yaml.safe_load((ROOT / e2e.SCALES["gpu"]["config"]).read_text())
    on, off = (e2e.system_config(base, tier, e2e.SCALES["gpu"], 1 << 30, cpu=False) for tier in (True, False))
    for cfg in (on, off):
        args = cfg["applications"][0]["args"]
        assert args["ingress"]["deployment"]["num_replicas"] == 2
        assert "autoscaling_config" not in args["ingress"]["deployment"]
        assert args["models"][0]["deployment"]["num_replicas"] == 4
    args_on, args_off = on["applications"][0]["args"], off["applications"][0]["args"]
    assert args_on["kv_tier"]["enabled"] and not args_off["kv_tier"]["enabled"]
    args_on["kv_tier"]["enabled"] = False
    assert on == off


def test_tier_set_changes_only_tier_on_and_is_validated(monkeypatch, tmp_path) -> None:
    import yaml

    from benchmarks.gpu.kv_tier_e2e import ROOT
    base = yaml.safe_load((ROOT / e2e.SCALES["gpu"]["config"]).read_text())
    on, off = (e2e.system_config(base, tier, e2e.SCALES["gpu"], 1 << 30, cpu=False, tier_set={"parallel_loads": 4})
               for tier in (True, False))
    assert on["applications"][0]["args"]["kv_tier"]["parallel_loads"] == 4
    assert "parallel_loads" not in off["applications"][0]["args"]["kv_tier"]
    monkeypatch.setattr(e2e, "kv_bytes_per_token", lambda model_dir, dtype: 32768)
    runs = []
    monkeypatch.setattr(e2e, "run_system", lambda system, run, cfg, *a: runs.append(cfg) or {"system": system,
                                                                                          "run": run})
    e2e.main(["--scale", "gpu", "--order", "tier_on", "--out", str(tmp_path / "o.json"),
              "--tier-set", "parallel_loads=4", "--tier-set", "host_dma=staged"])
    tier = runs[0]["applications"][0]["args"]["kv_tier"]
    assert (tier["enabled"], tier["parallel_loads"], tier["host_dma"]) == (True, 4, "staged")
    for bad in ("parallel_loads=0", "no_such_field=1", "parallel_loads"):
        with pytest.raises(SystemExit):
            e2e.main(["--scale", "gpu", "--order", "tier_on", "--out", str(tmp_path / "o.json"), "--tier-set", bad])


def test_gpu_8b_scale_puts_two_8b_replicas_on_one_gpu_and_outgrows_their_caches_not_their_slots() -> None:
    import yaml

    from benchmarks.gpu.kv_tier_e2e import ROOT
    scale = e2e.SCALES["gpu-8b"]
    base = yaml.safe_load((ROOT / scale["config"]).read_text())
    per_token = 128 * 1024  # Llama-3.1-8B: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes
    on = e2e.system_config(base, True, scale, scale["kv_cache_tokens"] * per_token, cpu=False)
    m = on["applications"][0]["args"]["models"][0]
    assert m["id"] == "llama-3.1-8b" and m["deployment"]["num_replicas"] == 2
    assert m["deployment"]["ray_actor_options"]["num_gpus"] * 2 <= 1
    assert m["engine_kwargs"]["gpu_memory_utilization"] * 2 < 1  # vLLM checks it against free memory at start
    assert m["engine_kwargs"]["kv_cache_memory_bytes"] == 12 << 30
    doc_set = scale["docs"] * 6144 * per_token
    assert (2 * (12 << 30) < doc_set <= scale["tier"]["budget_gib"] * (1 << 30)
            <= 0.6 * scale["object_store_gib"] * (1 << 30))
    # the requests in flight fit one replica's KV with room for cached documents: they do not queue for blocks
    longest = 8192 + 64 + 64
    assert scale["concurrency"] / 2 * longest <= 0.7 * scale["kv_cache_tokens"]
    assert scale["kill_at_s"] + 90 < scale["duration_s"] and not scale["num_requests"]  # the replacement serves


COMMON = 'Component="core_worker",NodeAddress="10.0.0.1",SessionName="s",Version="2.60.0"'
DEP = "vllm-llama-3-2-1b"
INF = float("inf")


def hist(name: str, labels: str, buckets: dict[float, float], total: float) -> list[str]:
    lab = f"{COMMON},{labels}"
    lines = [f'{name}_bucket{{{lab},le="{"+Inf" if le == INF else le}"}} {n}' for le, n in buckets.items()]
    return [*lines, f"{name}_count{{{lab}}} {max(buckets.values())}", f"{name}_sum{{{lab}}} {total}"]


def scrape_text(n: float) -> str:
    """A scrape after ``n`` requests per replica (n = 0: the scrape before the bench)."""
    k = n / 10
    lines = [f'ray_serve_deployment_request_counter_total{{{COMMON},application="kvserve",deployment="{DEP}",'
             f'replica="{r}",route="/"}} {n * (i + 1)}' for i, r in enumerate(("r-a", "r-b"))]
    lines += hist("ray_kvserve_stage_engine_milliseconds", 'model="m",replica="r-a"', {100: 10 * k, INF: 10 * k},
                  500 * k)
    lines += hist("ray_kvserve_stage_dispatch_milliseconds", 'model="m",replica="ing"', {1: 10 * k, INF: 10 * k}, 5 * k)
    lines += hist("ray_vllm_request_queue_time_seconds", 'ReplicaId="r-a",engine="0"', {0.1: 5 * k, 1.0: 10 * k,
                                                                                          INF: 10 * k}, 4 * k)
    lines += hist("ray_vllm_request_queue_time_seconds", 'ReplicaId="r-b",engine="0"', {0.1: 10 * k, 1.0: 10 * k,
                                                                                          INF: 10 * k}, k)
    lines += hist("ray_vllm_request_prefill_time_seconds", 'ReplicaId="r-a",engine="0"', {0.1: 10 * k, INF: 10 * k},
                  0.5 * k)
    lines += hist("ray_kvserve_kv_tier_load_latency_milliseconds", 'model="m"', {50: 4 * k, 100: 8 * k, INF: 8 * k},
                  480 * k)
    for phase, (le, ms) in {"queue": (1, 8), "locate": (2, 16), "get": (10, 80), "copy": (50, 640)}.items():
        lines += hist("ray_kvserve_kv_tier_load_phase_milliseconds", f'model="m",phase="{phase}"',
                      {le: 8 * k, INF: 8 * k}, ms * k)
    return "\n".join(lines) + "\n"


def test_run_evidence_splits_where_requests_waited_from_two_scrapes() -> None:
    before, after = parse(scrape_text(10)), parse(scrape_text(30))  # 20 more requests on r-a, 40 on r-b
    ev = kv_tier_evidence.run_evidence(before, after, DEP)
    assert ev["requests_by_replica"] == {"r-a": 20, "r-b": 40} and ev["requests"] == 60
    assert ev["stages_ms"]["engine"]["n"] == 20 and ev["stages_ms"]["engine"]["mean"] == 50.0
    assert ev["stages_ms"]["dispatch"]["mean"] == 0.5
    assert ev["engine_stage_ms_by_replica"]["r-a"]["mean"] == 50.0
    assert (ev["engine_by_replica"]["r-a"]["queue_ms_mean"] == 400.0
            and ev["engine_by_replica"]["r-a"]["queue_ms_p50"] == 100.0)
    assert ev["engine_by_replica"]["r-b"]["queue_ms_mean"] == 100.0
    assert ev["engine_by_replica"]["r-a"]["prefill_ms_mean"] == 50.0
    assert ev["engine_ms"]["queue"] == {"n": 40, "mean": 250.0, "p50": 66.67, "p90": 640.0,
                                        "p50_bucket": [0.0, 100.0], "p90_bucket": [100.0, 1000.0]}
    assert set(ev["engine_ms"]) == {"queue", "prefill"}  # histograms with no request left out
    assert ev["kv_tier_load_ms"] == {"n": 16, "mean": 60.0, "p50": 50.0, "p90": 90.0,
                                     "p50_bucket": [0.0, 50.0], "p90_bucket": [50.0, 100.0]}
    assert {p: h["mean"] for p, h in ev["kv_tier_load_phases_ms"].items()} == \
        {"queue": 1.0, "locate": 2.0, "get": 10.0, "copy": 80.0}
    assert ev["kv_tier_load_phases_ms"]["copy"]["n"] == 16
    empty = kv_tier_evidence.run_evidence({}, {}, DEP)  # a failed scrape: empty evidence, no error
    assert empty["kv_tier_load_ms"] is None and empty["kv_tier_load_phases_ms"] == {} and empty["stages_ms"] == {}


def test_metric_sums_keep_tier_load_phases_apart() -> None:
    sums = kv_tier_evidence.metric_sums(parse(scrape_text(10)))
    assert sums["kv_tier_load_phase_milliseconds_sum:copy"] == 640.0
    assert sums["kv_tier_load_phase_milliseconds_count:get"] == 8.0
    assert sums["kv_tier_load_latency_milliseconds_sum"] == 480.0
    assert not any(k.startswith(("stage_", "vllm")) for k in sums)
    assert e2e.metric_sums is kv_tier_evidence.metric_sums
