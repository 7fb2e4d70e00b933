"""The routing head-to-head harness: derived configs, Ray's router's view of token prompts, the summary and
its targets, the Mooncake replay's time scale, merging pieces into one result, the device plan."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from benchmarks.bench.workloads.mooncake import MooncakeWorkload
from benchmarks.routing_h2h import plan, run, summary
from benchmarks.routing_h2h.replay import time_scale_for, trace_replay
from benchmarks.routing_h2h.summary import DEFAULT_STRATEGY, ONE_INGRESS, TARGETS, TWO_INGRESS, summarize, table
from benchmarks.routing_h2h.systems import RAY_ROUTER_CLASS, SCALES, SYSTEMS, system_config
from serve_app import settings
from serve_app.config import RoutingConfig, load_app_config

ROOT = Path(__file__).resolve().parents[2]

@pytest.mark.parametrize("system", list(SYSTEMS))
@pytest.mark.parametrize("config, scale", [("configs/cpu.yaml", "cpu"), ("configs/gpu-routing.yaml", "gpu")])
def test_each_system_config_differs_only_in_routing_and_engine_overrides(system: str, config: str, scale: str) -> None:
    base = yaml.safe_load((ROOT / config).read_text())
    overrides = SCALES[scale]["engine_kwargs"]
    cfg = system_config(base, system, overrides)
    args = cfg["applications"][0]["args"]
    app = load_app_config(args)  # still a valid kvserve config
    assert app.models[0].engine_kwargs == {**base["applications"][0]["args"]["models"][0]["engine_kwargs"],
                                           **overrides}
    if system.startswith("ray-prefix-cache-affinity"):
        assert app.routing.request_router_class == RAY_ROUTER_CLASS
        assert app.routing.request_router_kwargs == SYSTEMS[system]["routing"].get("request_router_kwargs", {})
    else:
        strategy = SYSTEMS[system]["routing"]["strategy"]
        assert app.routing.strategy == strategy and app.routing.request_router_class is None
        for key, value in SYSTEMS[system]["routing"].items():
            assert getattr(app.routing, key) == value
        assert app.routing.publishes_kv_events() == (strategy == "kv-aware" or system.endswith("+events"))
    own = base["applications"][0]["args"]["ingress"]["deployment"]["num_replicas"]
    assert app.ingress.deployment.num_replicas == {TWO_INGRESS: 2, ONE_INGRESS: 1}.get(system, own)
    rest = {k: v for k, v in args.items() if k not in ("routing", "models", "ingress")}
    assert rest == {k: v for k, v in base["applications"][0]["args"].items()
                    if k not in ("routing", "models", "ingress")}
    assert base["applications"][0]["args"]["routing"] == {"strategy": "kv-aware"}  # base left untouched


def test_ray_router_sees_shared_token_prefixes_as_shared_text() -> None:
    pytest.importorskip("ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router")
    from benchmarks.routing_h2h.ray_router import RayPrefixCacheAffinity, tokens_as_text

    router = RayPrefixCacheAffinity.__new__(RayPrefixCacheAffinity)  # no Serve state needed for extraction
    doc = list(range(100, 400))
    a = router._extract_text_from_request(SimpleNamespace(args=[SimpleNamespace(prompt_token_ids=doc + [1, 2])]))
    b = router._extract_text_from_request(SimpleNamespace(args=[SimpleNamespace(prompt_token_ids=doc + [3])]))
    assert len(a) == 302 and a[:300] == b[:300] and a[300] != b[300]
    tokens_as_text(list(range(0, 200_000, 997))).encode("utf-8")  # no surrogates: every id is encodable text


class _Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[float, dict]] = []

    def observe(self, value: float, tags: dict) -> None:
        self.seen.append((value, tags))


def test_ray_router_times_its_steps_and_the_wait_for_its_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = pytest.importorskip("benchmarks.routing_h2h.ray_router")
    import asyncio
    import time

    base = mod.PrefixCacheAffinityRouter

    async def match(self, pending_request, candidate_replicas):
        await self._probe_queue_lens(candidate_replicas, 0)
        time.sleep(0.004)  # noqa: ASYNC251 -- Ray's synchronous ray.get to its tree actor blocks the same way
        return [candidate_replicas[:1]]

    async def probe(self, replicas, backoff_index):
        await asyncio.sleep(0.003)
        return [(r, 0) for r in replicas]

    async def choose(self, candidate_replicas, pending_request=None):
        return await self._prefix_match_best_replicas(pending_request, candidate_replicas)

    monkeypatch.setattr(base, "_prefix_match_best_replicas", match)
    monkeypatch.setattr(base, "_probe_queue_lens", probe)
    monkeypatch.setattr(base, "choose_replicas", choose)
    monkeypatch.setattr(base, "on_request_routed", lambda self, pr, rid, result: time.sleep(0.002))
    steps, stage = _Recorder(), SimpleNamespace(route_wait_ms=_Recorder(), router_decision_latency_us=_Recorder())
    monkeypatch.setattr(mod, "call_ms", lambda: steps)
    monkeypatch.setattr(mod, "metrics", lambda: stage)
    router = mod.RayPrefixCacheAffinity.__new__(mod.RayPrefixCacheAffinity)
    pending = SimpleNamespace(args=[SimpleNamespace(prompt_token_ids=[1, 2], model_id="m")],
                              created_at=time.time() - 0.05)
    assert asyncio.run(router.choose_replicas(["r0", "r1"], pending)) == [["r0"]]
    time.sleep(0.005)  # Serve's send and the replica's reply
    router.on_request_routed(pending, "r0", None)
    router.on_request_routed(SimpleNamespace(args=[]), "r1", None)  # a request it did not decide: no lag
    by_call = {tags["call"]: ms for ms, tags in steps.seen}
    assert set(by_call) == {"probe", "match", "insert", "routed"}
    assert [tags["call"] for _, tags in steps.seen].count("routed") == 1 and by_call["routed"] >= 5
    assert 3 <= by_call["probe"] < by_call["match"] and by_call["match"] >= 7 and by_call["insert"] >= 2
    (wait, tags), = stage.route_wait_ms.seen
    assert wait >= 50 + 7 and tags == {"model": "m"}  # from the handle call, through the decision
    (us, tags), = stage.router_decision_latency_us.seen
    assert 7_000 <= us < wait * 1000 and tags == {"strategy": "ray-prefix-cache-affinity"}


def _h(ttft: float, tps: float, hit: float | None = 0.5, n: int = 100) -> dict:
    return {"ttft_p50_ms": ttft, "ttft_p90_ms": ttft * 2, "ttft_p99_ms": ttft * 3, "output_tok_per_s": tps,
            "requests_per_s": tps / 10, "cache_hit_rate": hit, "completed": n, "errors": 0}


def _results() -> dict:
    """A matrix where the default strategy meets every target but the two-ingress one."""
    shared = {"sat": _h(1000, 100, 0.4), "r25": _h(100, 25, 0.4)}
    no_sharing = {"sat": _h(400, 90, 0.0), "r25": _h(50, 20, 0.0), "r70": _h(80, 60, 0.0)}
    return {
        "round-robin": {"routing": {"strategy": "round-robin"}, "runs": [{}], "docqa": shared,
                        "multiturn": {"sat": _h(500, 200)}, "mooncake": {"sat": _h(2000, 50)},
                        "no-sharing": no_sharing},
        "kv-aware": {"docqa": {"sat": _h(250, 190, 0.9, n=180), "r25": _h(20, 25, 0.9)},
                         "multiturn": {"sat": _h(150, 300)}, "mooncake": {"sat": _h(900, 60, 0.3)},
                         "no-sharing": {"sat": _h(410, 90, 0.0), "r25": _h(48, 20, 0.0),
                                        "r70": _h(80, 59, 0.0)}},
        "ray-prefix-cache-affinity": {"docqa": {"sat": _h(1000, 120)}, "multiturn": {"sat": _h(450, 250)},
                                      "mooncake": {"sat": _h(2000, 55)}},
        "kv-aware-2ingress": {"docqa": {"sat": _h(260, 185, 0.88)}, "mooncake": {"sat": _h(1000, 58, 0.25)}},
    }


def test_summary_carries_the_issue_keys_and_targets() -> None:
    s = summarize(_results())
    assert s["default_strategy"] == RoutingConfig().strategy == DEFAULT_STRATEGY
    assert s["ttft_p50_ratio_vs_round_robin"] == 0.25 and s["throughput_ratio_vs_round_robin"] == 1.9
    assert s["multiturn_ttft_p50_ratio_vs_round_robin"] == 0.3
    assert s["mooncake_ttft_p50_ratio_vs_round_robin"] == 0.45
    assert s["ttft_p50_ratio_vs_ray_router_by_workload"] == {"docqa": 0.25, "multiturn": 0.333, "mooncake": 0.45}
    assert s["ttft_p50_ratio_vs_ray_router"] == 0.45  # every shared-prefix workload: the highest
    assert s["no_sharing_by_load"]["r25"] == {"ttft_p50_ratio": 0.96, "throughput_ratio": 1.0}
    assert s["no_sharing_ttft_p50_ratio"] == 0.96  # every load: the furthest from 1 (r25's -4% beats sat's +2.5%)
    assert s["no_sharing_throughput_ratio"] == 0.983
    assert s["two_ingress_hit_rate_delta_by_cell"] == {"docqa/sat": -2.0, "mooncake/sat": -5.0}
    assert s["two_ingress_hit_rate_delta"] == -5.0
    assert s["targets"] == {"ttft_p50_ratio_vs_round_robin": "<= 0.3", "throughput_ratio_vs_round_robin": ">= 1.8",
                            "multiturn_ttft_p50_ratio_vs_round_robin": "<= 0.4",
                            "mooncake_ttft_p50_ratio_vs_round_robin": "<= 0.5",
                            "ttft_p50_ratio_vs_ray_router": "<= 0.5",
                            "no_sharing_ttft_p50_ratio": "0.95..1.05", "no_sharing_throughput_ratio": "0.95..1.05",
                            "two_ingress_hit_rate_delta": "|x| <= 3"}
    assert s["met"] == {k: k != "two_ingress_hit_rate_delta" for k in TARGETS}
    assert s["requests"]["kv-aware"]["docqa"] == {"sat": 180, "r25": 100}
    assert "routing" not in s["requests"]["round-robin"] and "runs" not in s["requests"]["round-robin"]
    assert s["by_strategy"]["kv-aware"]["ttft_p50_ratio_vs_round_robin"] == 0.25
    md = table(_results())
    assert "| docqa | sat | kv-aware | 180 | 250 | 500 | 750 | 190.0 | 0.90 | 0 |" in md
    assert md.count("| docqa |") == 6


def test_summary_leaves_unmeasured_or_failed_cells_unjudged() -> None:
    results = _results()
    results["kv-aware"]["mooncake"]["sat"] = {"error": "bench exited with 1"}
    del results["ray-prefix-cache-affinity"], results["kv-aware-2ingress"]
    s = summarize(results)
    assert (s["mooncake_ttft_p50_ratio_vs_round_robin"] is None
            and s["met"]["mooncake_ttft_p50_ratio_vs_round_robin"] is None)
    assert s["ttft_p50_ratio_vs_ray_router"] is None and s["two_ingress_hit_rate_delta"] is None
    assert s["met"]["ttft_p50_ratio_vs_round_robin"] is True
    assert "| mooncake | sat | kv-aware | - | - | - | - | - | - | bench exited with 1 |" in table(results)


def test_two_ingress_delta_pairs_the_default_with_its_variant_at_either_base_count() -> None:
    results = _results()  # base config at one ingress: kv-aware (1) against kv-aware-2ingress
    assert summarize(results)["two_ingress_hit_rate_delta_by_cell"] == {"docqa/sat": -2.0, "mooncake/sat": -5.0}
    two = results.pop("kv-aware-2ingress")  # base config at two: kv-aware (2) against kv-aware-1ingress
    results[ONE_INGRESS] = {"ingress_replicas": 1, "docqa": results["kv-aware"]["docqa"],
                            "mooncake": results["kv-aware"]["mooncake"]}
    results["kv-aware"] = {**results["kv-aware"], "ingress_replicas": 2, "docqa": two["docqa"],
                           "mooncake": two["mooncake"]}
    s = summarize(results)
    assert s["two_ingress_hit_rate_delta_by_cell"] == {"docqa/sat": -2.0, "mooncake/sat": -5.0}
    results["kv-aware"]["ingress_replicas"] = 1  # two systems at one ingress: no pair, no verdict
    assert summarize(results)["two_ingress_hit_rate_delta"] is None


def test_the_ingress_variant_is_the_count_the_base_config_lacks(capsys: pytest.CaptureFixture) -> None:
    gpu = yaml.safe_load((ROOT / "configs/gpu-routing.yaml").read_text())
    cpu = yaml.safe_load((ROOT / "configs/cpu.yaml").read_text())
    assert run.config_ingress_replicas(gpu) == 2 and run.ingress_variant(gpu) == ONE_INGRESS
    assert run.config_ingress_replicas(cpu) == 1 and run.ingress_variant(cpu) == TWO_INGRESS
    assert ONE_INGRESS in run.default_systems(gpu) and TWO_INGRESS not in run.default_systems(gpu)
    with pytest.raises(SystemExit):
        run.main(["--config", "configs/gpu-routing.yaml", "--scale", "gpu", "--systems", TWO_INGRESS,
                  "--plan", "full"])
    assert "already runs 2 ingress replica(s); use kv-aware-1ingress" in capsys.readouterr().err


def _trace(tmp_path: Path, stamps_ms: list[int]) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(f'{{"timestamp": {t}, "input_length": 600, "output_length": 4, "hash_ids": [0, {i}]}}\n'
                            for i, t in enumerate(stamps_ms)))
    return path


def test_time_scale_makes_the_replayed_lines_arrive_at_the_target_mean_rate(tmp_path: Path) -> None:
    r = time_scale_for([0, 0, 3000, 3000, 9000], 2.0)  # 4 gaps over 9 s: 0.444 req/s in the trace
    assert r.num_requests == 5 and r.span_s == 9.0 and r.trace_rate_per_s == 0.444444
    assert r.time_scale == pytest.approx(4.5)
    assert r.bench_args() == ["--trace", "--time-scale", "4.5", "--num-requests", "5"]
    with pytest.raises(ValueError, match="no mean rate"):
        time_scale_for([0, 0, 0], 1.0)

    path = _trace(tmp_path, [0, 0, 1000, 1500, 4000, 4000, 7000, 9000, 12000, 20000])
    replay = trace_replay(path, target_rate_per_s=0.5, duration_s=12)  # 6 lines, 4 s in the trace: slowed down
    assert replay.num_requests == 6 and replay.time_scale == pytest.approx(0.5 * 4 / 5)
    wl = MooncakeWorkload(path=path, time_scale=replay.time_scale, limit=replay.num_requests, block_tokens=16)
    arrivals = [s.arrival_s for s in wl.sessions()]
    assert len(arrivals) == 6 and (len(arrivals) - 1) / arrivals[-1] == pytest.approx(0.5)
    assert arrivals[-1] <= 12  # all of them sent within --duration
    assert trace_replay(path, 0.5, 12, start=2).span_s == 8.0  # from line 2: 1000..9000 ms


def test_trace_path_is_declared_once_and_relative_to_the_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings.mooncake_trace() == (ROOT.parent / "shared/traces/mooncake/conversation_trace.jsonl").resolve()
    monkeypatch.setenv("KVSERVE_MOONCAKE_TRACE", ".carry/mooncake/conversation_trace.jsonl")
    assert settings.mooncake_trace() == ROOT / ".carry/mooncake/conversation_trace.jsonl"
    assert MooncakeWorkload.__dataclass_fields__["path"].default_factory is settings.mooncake_trace


def test_loads_select_cells_in_workload_order_sat_first() -> None:
    wls, levels = ["docqa", "no-sharing", "mooncake"], ["sat", "r25", "r70"]
    assert run.parse_loads(None, wls, levels) == [(w, lv) for w in wls for lv in levels]
    assert run.parse_loads("r70,sat", ["docqa"], levels) == [("docqa", "sat"), ("docqa", "r70")]
    assert run.parse_loads("docqa:sat,no-sharing:r25,r40", wls, levels) == [
        ("docqa", "sat"), ("docqa", "r40"), ("no-sharing", "r25"), ("no-sharing", "r40"), ("mooncake", "r40")]
    for bad in ("fast", "multiturn:sat", "docqa:r"):
        with pytest.raises(ValueError, match="--loads"):
            run.parse_loads(bad, wls, levels)
    assert run.system_cells(TWO_INGRESS, [("docqa", "sat"), ("no-sharing", "sat"), ("mooncake", "r25")]) == [
        ("docqa", "sat"), ("mooncake", "r25")]


def test_merge_replaces_only_the_rerun_cells() -> None:
    old = {"routing": {"strategy": "prefix-aware"}, "started_at": "t0", "ready_s": 150.0,
           "docqa": {"sat": _h(300, 100), "r25": _h(30, 25)}, "multiturn": {"sat": _h(200, 50)}}
    new = {"routing": {"strategy": "prefix-aware"}, "ingress_replicas": 1, "runs": [{"started_at": "t1"}],
           "docqa": {"sat": _h(250, 110)}, "mooncake": {"sat": _h(900, 40)}}
    m = run.merge_system(old, new)
    assert m["docqa"] == {"sat": _h(250, 110), "r25": _h(30, 25)} and m["multiturn"] == {"sat": _h(200, 50)}
    assert m["mooncake"] == {"sat": _h(900, 40)}
    assert m["runs"] == [{"started_at": "t0", "ready_s": 150.0}, {"started_at": "t1"}]
    assert "started_at" not in m and run.merge_system(m, new)["runs"][-2:] == [{"started_at": "t1"}] * 2


def test_pieces_merge_into_one_result_at_round_robins_rates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_run_system(name, cfg, scale, cells, doc, args, save):  # what run_system records, without a server
        calls.append((name, cells))
        out = {"routing": cfg["applications"][0]["args"]["routing"],
               "runs": [{"cells": [f"{wl}:{lv}" for wl, lv in cells]}]}
        for wl, lv in cells:
            cell = _h(100 if name == "round-robin" else 50, 40) | {"rate": run.rate_for(doc, wl, lv) if lv != "sat"
                                                                   else None}
            out.setdefault(wl, {})[lv] = cell
            if name == "round-robin" and lv == "sat":
                doc["calibration"].setdefault(wl, cell["requests_per_s"])
            save(out)
            assert wl in __import__("json").loads(Path(args.out).read_text())["results"][name]  # written per cell
        return out

    monkeypatch.setattr(run, "run_system", fake_run_system)
    out = tmp_path / "r.json"
    common = ["--config", "configs/gpu-routing.yaml", "--scale", "gpu", "--merge", "--out", str(out),
              "--work-dir", str(tmp_path / "w")]
    with pytest.raises(SystemExit):  # nothing calibrated yet: kv-aware's r25 would have no rate
        run.main([*common, "--systems", "kv-aware", "--workloads", "docqa", "--loads", "sat,r25"])
    assert run.main([*common, "--systems", "round-robin", "--workloads", "docqa,no-sharing"]) == 0
    assert run.main([*common, "--systems", "kv-aware", "--workloads", "docqa", "--loads", "sat,r25"]) == 0
    assert run.main([*common, "--systems", "kv-aware", "--workloads", "docqa", "--loads", "r25"]) == 0  # a rerun
    doc = __import__("json").loads(out.read_text())
    assert doc["calibration"] == {"docqa": 4.0, "no-sharing": 4.0}
    assert doc["rates"]["docqa"] == {"r25": 1.0, "r70": 2.8}
    assert set(doc["results"]["round-robin"]["docqa"]) == {"sat", "r25", "r70"}
    assert doc["results"]["kv-aware"]["docqa"]["r25"]["rate"] == 1.0
    assert len(doc["results"]["kv-aware"]["runs"]) == 2 and len(doc["commands"]) == 3
    assert doc["summary"]["ttft_p50_ratio_vs_round_robin"] == 0.5
    assert calls[-1] == ("kv-aware", [("docqa", "r25")])
    # the first call ran docqa and no-sharing: a later call's workload joins the settings every cell ran with
    assert set(doc["scale_settings"]["workloads"]) == {"docqa", "no-sharing"}
    assert run.main([*common, "--systems", "round-robin", "--workloads", "multiturn", "--loads", "sat"]) == 0
    held = __import__("json").loads(out.read_text())["scale_settings"]["workloads"]
    assert set(held) == {"docqa", "no-sharing", "multiturn"}
    assert held["docqa"] == doc["scale_settings"]["workloads"]["docqa"]
    with pytest.raises(SystemExit):  # another base config cannot merge into this result
        run.main([*common[:1], "configs/cpu.yaml", *common[2:], "--systems", "round-robin"])
    edited = __import__("json").loads(out.read_text())
    edited["scale_settings"]["workloads"]["docqa"] = ["--workload", "docqa", "--docs", "2"]
    out.write_text(__import__("json").dumps(edited))
    with pytest.raises(SystemExit):  # nor a workload the result ran with other settings
        run.main([*common, "--systems", "round-robin", "--workloads", "docqa", "--loads", "sat"])


@pytest.mark.parametrize("preset", ["full", "summary"])
def test_plan_calls_fit_the_device_limit_and_select_their_cells(preset: str, capsys: pytest.CaptureFixture) -> None:
    assert run.main(["--scale", "gpu", "--plan", preset]) == 0
    text = capsys.readouterr().out
    cmds = [line for line in text.splitlines() if not line.startswith("#")]
    estimates = [float(line.rsplit("(~", 1)[1].split(" s)")[0]) for line in text.splitlines() if "(~" in line]
    assert len(cmds) == len(estimates) > 0 and max(estimates) <= plan.LIMIT_S
    seen: dict[str, list] = {}
    for cmd in cmds:
        assert len(cmd) < 2000 and "run_on_device.sh 560 -m benchmarks.routing_h2h.run " in cmd
        args = run.parser().parse_args(cmd.split("benchmarks.routing_h2h.run ", 1)[1].split())
        assert args.merge and args.trace_file == ROOT / plan.TRACE and len(args.systems.split(",")) == 1
        cells = run.parse_loads(args.loads, args.workloads.split(","), run.levels_of(SCALES["gpu"]["fractions"]))
        seen.setdefault(args.systems, []).extend(cells)
    assert next(iter(seen)) == "round-robin"
    levels = run.levels_of(SCALES["gpu"]["fractions"])
    if preset == "summary":
        assert seen == plan.summary_cells(levels, ONE_INGRESS)  # gpu-routing.yaml runs two ingress replicas
    else:
        assert {s: sorted(c) for s, c in seen.items()} == {
            s: sorted(run.system_cells(s, run.parse_loads(None, list(SCALES["gpu"]["workloads"]), levels)))
            for s in SYSTEMS if s not in run.DIAGNOSTIC and s != TWO_INGRESS}


def test_pack_starts_a_new_call_when_the_next_cell_would_pass_the_limit() -> None:
    cells = [("docqa", lv) for lv in ("sat", "r25", "r70")]
    calls = plan.pack({"round-robin": cells, "kv-aware": cells}, duration_s=100, limit_s=460)
    # 113 s per cell; 130 s start + 15 s stop per call, and 190 s more for the machine's first call
    assert [(c.system, len(c.cells), c.estimate_s) for c in calls] == [
        ("round-robin", 1, 448), ("round-robin", 2, 371), ("kv-aware", 2, 371), ("kv-aware", 1, 258)]
    with pytest.raises(ValueError, match="does not fit"):
        plan.pack({"round-robin": cells}, duration_s=400, limit_s=560)


def test_mooncake_lighter_loads_replay_the_trace_scaled_to_the_target_rate(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sent = []
    monkeypatch.setattr(run, "run_bench",
                        lambda url, model, wl, load, d, out, label, **kw: sent.append((wl, load)) or {})
    path = _trace(tmp_path, [i * 500 for i in range(40)])  # 2 req/s in the trace
    args = SimpleNamespace(trace_file=path)
    scale = {"concurrency": 64, "duration_s": 10, "workloads": SCALES["gpu"]["workloads"]}
    doc = {"calibration": {"mooncake": 4.0}}
    cell = run.run_cell("prefix-aware", "mooncake", "r25", scale["workloads"]["mooncake"], scale, doc,
                        ("http://x/v1", "m", tmp_path), args)
    wl, load = sent[-1]
    assert wl[-2:] == ["--trace-file", str(path)]
    assert load == ["--trace", "--time-scale", "0.5", "--num-requests", "10", "--prompt-salt", "r25"]
    assert cell["trace_replay"]["time_scale"] == 0.5 and doc["rates"] == {"mooncake": {"r25": 1.0}}
    assert "no arrival rate" in run.run_cell("x", "docqa", "r25", [], scale, doc, ("u", "m", tmp_path), args)["error"]


def test_client_processes_pass_through_to_every_cell_and_the_device_plan(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    sent = []
    monkeypatch.setattr(run, "run_bench", lambda url, model, wl, load, d, out, label, **kw: sent.append(load) or {})
    scale = {"concurrency": 64, "duration_s": 10, "workloads": {}}
    doc = {"calibration": {"docqa": 10.0}}
    for processes in (1, 3):
        args = SimpleNamespace(trace_file=tmp_path / "none", client_processes=processes)
        for level in ("sat", "r25"):
            run.run_cell("kv-aware", "docqa", level, ["--workload", "docqa"], scale, doc, ("u", "m", tmp_path), args)
    assert sent == [["--concurrency", "64"], ["--rate", "2.5"],
                    ["--concurrency", "64", "--processes", "3"], ["--rate", "2.5", "--processes", "3"]]
    args = run.parser().parse_args(["--scale", "gpu", "--plan", "summary", "--client-processes", "2"])
    assert args.client_processes == 2 and run.parser().parse_args([]).client_processes is None  # the scale's
    with pytest.raises(SystemExit):
        run.main(["--scale", "gpu", "--plan", "summary", "--client-processes", "0"])
    calls = plan.pack({"kv-aware": [("docqa", "sat")]}, duration_s=30, limit_s=560)
    assert all(c.endswith("--client-processes 2") for c in plan.commands(calls, 30, extra=("--client-processes", "2")))
    assert "--client-processes" not in plan.commands(calls, 30)[0]
    run.main(["--scale", "gpu", "--plan", "summary"])  # the gpu scale's default: four
    assert all(line.endswith("--client-processes 4") for line in capsys.readouterr().out.splitlines()
               if not line.startswith("#"))
    run.main(["--scale", "gpu", "--plan", "summary", "--profile", "docqa:sat"])  # --profile travels with the calls
    assert all(line.endswith("--client-processes 4 --profile docqa:sat")
               for line in capsys.readouterr().out.splitlines() if not line.startswith("#"))
    run.main(["--scale", "gpu", "--plan", "summary", "--ray-trace"])  # so does --ray-trace
    assert all(line.endswith("--client-processes 4 --ray-trace")
               for line in capsys.readouterr().out.splitlines() if not line.startswith("#"))


def test_a_mooncake_cell_replays_through_the_bench_at_the_target_rate(tmp_path: Path) -> None:
    fake = pytest.importorskip("tests.unit.fake_openai")  # a fake OpenAI streaming server (aiohttp)
    path = _trace(tmp_path, [i * 500 for i in range(40)])  # 2 req/s in the trace
    scale = {"concurrency": 4, "duration_s": 3, "workloads": {}}
    wl_args = ["--workload", "mooncake", "--block-tokens", "16", "--max-output-tokens", "2", "--warmup", "0"]
    with fake.FakeOpenAI(ttft_s=0.0, itl_s=0.0) as server:
        cell = run.run_cell("round-robin", "mooncake", "r50", wl_args, scale, {"calibration": {"mooncake": 8.0}},
                            (server.base_url, "fake", tmp_path), SimpleNamespace(trace_file=path))
    assert "error" not in cell, cell
    assert cell["completed"] == 12 and cell["load"]["mode"] == "trace"  # 4 req/s x 3 s
    assert cell["trace_replay"]["time_scale"] == 2.0 and "--prompt-salt r50" in cell["command"]


def test_leftovers_of_an_earlier_server_are_ended_before_a_start(monkeypatch: pytest.MonkeyPatch) -> None:
    procs = [{"pid": 11, "cmd": "VLLM::EngineCore"}, {"pid": 12, "cmd": "/usr/sbin/haproxy -f x.cfg"}]
    seen = iter([{"listening": [8000], "processes": procs}, {"listening": [], "processes": []}])
    killed = []
    monkeypatch.setattr(run.serverproc, "leftovers", lambda ports: next(seen))
    monkeypatch.setattr(run.serverproc, "kill_found", lambda p, word: killed.append(word) or {"killed": p})
    monkeypatch.setattr(run.subprocess, "run", lambda *a, **k: None)
    found = run.clear_leftovers((8000, 8404))
    assert killed == ["EngineCor", "haproxy"] and found["after"] == {"listening": [], "processes": []}


def test_plot_series_orders_loads_and_skips_failed_cells() -> None:
    from benchmarks.routing_h2h.plot import level_x, series

    results = _results()
    results["kv-aware"]["no-sharing"]["r70"] = {"error": "bench exited with 1"}
    s = series(results)
    assert level_x("sat") == 1.0 and level_x("r25") == 0.25
    assert [x for x, _ in s["no-sharing"]["round-robin"]] == [0.25, 0.7, 1.0]
    assert s["no-sharing"]["kv-aware"] == [(0.25, 48), (1.0, 410)]
    assert "routing" not in s and "runs" not in s


def test_plan_result_names_the_file_every_call_seeds_and_merges_into(capsys: pytest.CaptureFixture) -> None:
    """``--plan-result`` (an H100's result on an H100): the calls seed from it and write its name under /tmp/res."""
    kept = "benchmarks/results/routing_h100_5ba85f3.json"
    assert run.main(["--scale", "gpu", "--plan", "summary", "--plan-result", kept]) == 0
    text = capsys.readouterr().out
    cmds = [line for line in text.splitlines() if not line.startswith("#")]
    assert cmds and f"copy the returned routing_h100_5ba85f3.json to {kept}" in text
    for cmd in cmds:
        assert cmd.startswith(f"mkdir -p /tmp/res && {{ [ -f /tmp/res/routing_h100_5ba85f3.json ] || cp {kept} ")
        args = run.parser().parse_args(cmd.split("benchmarks.routing_h2h.run ", 1)[1].split())
        assert args.out == "/tmp/res/routing_h100_5ba85f3.json" and args.merge
    assert "routing_h200" not in text


def test_ray_router_traces_each_decision_with_the_replica_taken(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    mod = pytest.importorskip("benchmarks.routing_h2h.ray_router")
    import asyncio
    import json
    from collections import deque

    base = mod.PrefixCacheAffinityRouter
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=u)) for u in ("r0", "r1")]

    async def choose(self, candidate_replicas, pending_request=None):
        return [[candidate_replicas[1]], [candidate_replicas[0]]]

    async def select(self, candidates, backoff_index):
        return candidates[0]

    monkeypatch.setattr(base, "choose_replicas", choose)
    monkeypatch.setattr(base, "_select_from_candidate_replicas", select)
    monkeypatch.setattr(mod, "metrics", lambda: SimpleNamespace(route_wait_ms=_Recorder(),
                                                                router_decision_latency_us=_Recorder()))
    router = mod.RayPrefixCacheAffinity.__new__(mod.RayPrefixCacheAffinity)
    router._trace, router._awaiting = tmp_path / "ray-router-1.jsonl", {}
    router._replicas_list, router._pending_requests_to_route = replicas, deque([1, 2])
    router._replica_queue_len_cache = SimpleNamespace(get=lambda rid: {"r0": 3, "r1": None}[rid.unique_id])
    pending = SimpleNamespace(args=[SimpleNamespace(prompt_token_ids=[1, 2, 3], model_id="m")], created_at=0.0)

    async def decide():
        ranks = await router.choose_replicas(replicas, pending)
        return await router._select_from_candidate_replicas(ranks[0], 0)

    assert asyncio.run(decide()).replica_id.unique_id == "r1"
    (line,) = [json.loads(x) for x in router._trace.read_text().splitlines()]
    assert line["candidates"] == ["r1"] and line["chosen"] == "r1" and line["prompt_tokens"] == 3
    assert line["queue"] == {"r0": 3, "r1": None} and line["waiting"] == 2 and router._awaiting == {}


def test_current_cells_are_those_whose_last_run_measured_todays_code() -> None:
    cell = {"ttft_p50_ms": 1.0}
    doc = {"results": {
        "kv-aware": {"runs": [{"git_commit": "new", "cells": ["docqa:sat", "mooncake:r70"]},
                              {"git_commit": "old", "cells": ["mooncake:r70"]},  # measured again, at older code
                              {"cells": ["multiturn:sat"]},  # no commit recorded
                              # cut by its limit: started both, finished docqa:r70 only
                              {"git_commit": "new", "cells": ["docqa:r70", "no-sharing:r70"], "done": ["docqa:r70"]},
                              {"git_commit": "new", "cells": ["multiturn:r25"]},  # cut before a done record existed
                              {"git_commit": "new", "cells": ["multiturn:r70"]}],  # its bench cut (stall.py)
                     "docqa": {"sat": cell, "r70": cell}, "mooncake": {"r70": cell},
                     "multiturn": {"sat": cell, "r70": {"error": "cut: ...", "cut": {"after_s": 120}}},
                     "no-sharing": {"r70": cell}},  # an older run's no-sharing:r70, not the cut run's
        "ray-prefix-cache-affinity": {"runs": [{"git_commit": "new", "cells": ["docqa:sat"]}],
                                      "docqa": {"sat": cell}}}}
    asked = []

    def same_code(sha: str, paths: tuple[str, ...]) -> bool:
        asked.append(paths)
        return sha == "new" and plan.RAY_ADAPTER not in paths

    assert plan.current_cells(doc, "kv-aware", same_code) == {("docqa", "sat"), ("docqa", "r70")}
    assert plan.current_cells(doc, "ray-prefix-cache-affinity", same_code) == set()  # its adapter changed since
    assert plan.current_cells(doc, "prefix-aware", same_code) == set()
    assert plan.RAY_ADAPTER in asked[-1] and "routers" in asked[0] and ":(exclude)serve_app/kuberay" in asked[0]


def _timeline(*firsts: dict[str, int]) -> dict:
    cell = {"ttft_p50_ms": 1.0, "ttft_p90_ms": 2.0, "ttft_p99_ms": 3.0, "output_tok_per_s": 10.0,
            "cache_hit_rate": 0.5, "completed": 9, "errors": 0}
    return cell | {"evidence": {"timeline": [{"t_s": 5.0 * (i + 1), "requests": r} for i, r in enumerate(firsts)]}}


def test_a_run_whose_first_cell_began_before_every_replica_ran_is_not_current() -> None:
    late = _timeline({"a": 30, "b": 14, "c": 0}, {"a": 20, "b": 20, "c": 20})  # c took its first request after 5 s
    light = _timeline({"a": 5, "b": 4, "c": 0}, {"a": 5, "b": 5, "c": 5})  # too few requests to tell
    even = _timeline({"a": 15, "b": 15, "c": 14})
    runs = [{"git_commit": "new", "cells": ["docqa:sat", "docqa:r70"]},  # late: both its cells stale
            {"git_commit": "new", "cells": ["multiturn:r25", "multiturn:r70"]},  # light first cell: kept
            {"git_commit": "new", "cells": ["mooncake:sat"]},
            # waited for every replica (run_system since the check): its timeline is not read
            {"git_commit": "new", "cells": ["no-sharing:sat"], "replicas_ready": {"waited_s": 3.0}},
            # could not wait (no Ray driver): judged by its timeline
            {"git_commit": "new", "cells": ["no-sharing:r25"], "replicas_ready": {"error": "ConnectionError: ..."}}]
    res = {"runs": runs, "docqa": {"sat": late, "r70": even}, "multiturn": {"r25": light, "r70": even},
           "mooncake": {"sat": even}, "no-sharing": {"sat": late, "r25": late}}
    assert [plan.started_late(res, r) for r in runs] == [True, False, False, False, True]
    current = plan.current_cells({"results": {"kv-aware": res}}, "kv-aware", lambda sha, paths: True)
    assert current == {("multiturn", "r25"), ("multiturn", "r70"), ("mooncake", "sat"), ("no-sharing", "sat")}
    late_ones = plan.late_cells(res)
    assert late_ones == {("docqa", "sat"), ("docqa", "r70"), ("no-sharing", "r25")}
    md = table({"kv-aware": res}, {"kv-aware": late_ones})
    assert "| docqa | sat | kv-aware \\* |" in md and "| mooncake | sat | kv-aware |" in md and summary.LATE_NOTE in md
    assert summary.LATE_NOTE not in table({"kv-aware": res})
    # a later run measured the late run's first cell again: the timeline held is that run's, so no judgement
    again = {**res, "runs": [*runs, {"git_commit": "new", "cells": ["docqa:sat"]}]}
    assert not plan.started_late(again, runs[0], later=again["runs"][1:])
    # ... unless the merge that replaced it judged the run first: its other cell (docqa:r70) stays late
    merged = run.merge_system(res, {"runs": [{"git_commit": "new", "cells": ["docqa:sat"],
                                                  "replicas_ready": {"waited_s": 1.0}}], "docqa": {"sat": even}})
    assert [r.get("started_late") for r in merged["runs"]] == [True, None, None, None, None, None]
    assert "started_late" not in runs[0]  # the old result is not changed
    assert plan.late_cells(merged) == {("docqa", "r70"), ("no-sharing", "r25")}
    # judged once: a later merge keeps the recorded answer though the timeline it read is gone
    assert plan.judge_replaced(merged, {"docqa:sat"})[0]["started_late"] is True


def test_plan_missing_leaves_out_the_current_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    kept = tmp_path / "kept.json"
    held = {"sat": {"ttft_p50_ms": 1.0}}
    kept.write_text(json.dumps({"results": {"round-robin": {"runs": [
        {"git_commit": "abc", "cells": ["docqa:sat", "multiturn:sat", "mooncake:sat"]}],
        "docqa": held, "multiturn": held, "mooncake": held}}}))
    monkeypatch.setattr(run, "same_code", lambda sha, paths: sha == "abc")
    assert run.main(["--scale", "gpu", "--plan", "full", "--plan-missing", "--plan-result", str(kept),
                     "--systems", "round-robin", "--workloads", "docqa,multiturn", "--loads", "sat,r25"]) == 0
    cells = [line.split(": ", 1)[1].rsplit(" (~", 1)[0] for line in capsys.readouterr().out.splitlines()
             if line.startswith("# 1.")]
    assert cells == ["docqa:r25 multiturn:r25"]
    assert run.main(["--scale", "gpu", "--plan", "full", "--plan-missing", "--plan-result", str(kept),
                     "--systems", "round-robin", "--workloads", "docqa", "--loads", "sat"]) == 0
    assert capsys.readouterr().out.startswith("# nothing to run:")


def test_plan_again_runs_every_closed_loop_and_poisson_cell_of_a_result_once_more(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--plan again``: the cells a result holds (a trace replay left out), Ray's in the order its last run took
    them, into a new ``--plan-result`` at the rates of ``--rates-from``, with the flags given passed to every call."""
    sat, r70 = {"mode": "concurrency", "concurrency": 64}, {"mode": "rate", "rate": 24.7}
    cell = lambda load: {"ttft_p50_ms": 1.0, "load": load}
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps({"results": {
        "kv-aware": {"docqa": {"sat": cell(sat), "r70": cell(r70)},
                     "mooncake": {"r70": cell({"mode": "trace"})}},
        "ray-prefix-cache-affinity": {"runs": [{"cells": ["mooncake:sat", "multiturn:sat"]},
                                               {"cells": ["docqa:sat", "multiturn:sat", "mooncake:sat"]}],
                                      "mooncake": {"sat": cell(sat)}, "docqa": {"sat": cell(sat)},
                                      "multiturn": {"sat": cell(sat)}}}}))
    new = "benchmarks/results/routing_h200_again2.json"
    assert run.main(["--scale", "gpu", "--plan", "again", "--again-of", str(kept), "--plan-result", new,
                     "--rates-from", "benchmarks/results/routing_h200.json", "--per-request", "--ray-trace",
                     "--client-processes", "4"]) == 0
    text = capsys.readouterr().out
    calls = [line.split(". ", 1)[1].rsplit(" (~", 1)[0] for line in text.splitlines() if line[:3] in ("# 1", "# 2")]
    assert calls == ["kv-aware: docqa:sat docqa:r70", "ray-prefix-cache-affinity: docqa:sat multiturn:sat mooncake:sat"]
    for cmd in (line for line in text.splitlines() if not line.startswith("#")):
        args = run.parser().parse_args(cmd.split("benchmarks.routing_h2h.run ", 1)[1].split())
        assert args.out == "/tmp/res/routing_h200_again2.json" and args.merge and args.per_request
        assert args.rates_from == "benchmarks/results/routing_h200.json" and args.ray_trace
        assert args.client_processes == 4
    assert plan.again_cells(json.loads(kept.read_text()), ["kv-aware"], [("docqa", "r70")]) == {
        "kv-aware": [("docqa", "r70")]}  # --loads narrows it
    with pytest.raises(SystemExit):
        run.main(["--scale", "gpu", "--plan", "again", "--again-of", str(tmp_path / "none.json")])
    assert f"--again-of: {tmp_path / 'none.json'} not found" in capsys.readouterr().err


def test_same_code_compares_a_commit_with_the_checkout() -> None:
    assert run.same_code("HEAD", ("no/such/path",)) is True
    assert run.same_code("0" * 40, ("no/such/path",)) is False  # a commit git does not know


def test_same_code_passes_over_neutral_commits_only() -> None:
    """A cell measured at the commit before the bench's drain fix (declared neutral) stays current across it, and
    not without the declaration (later changes of the same file count as neutral here, so the test lasts)."""
    def git(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *cmd], cwd=run.ROOT, capture_output=True, text=True, check=False)

    fix = "8038cd6140db0bc2f51026b06aeb245d4158f62e"
    paths = ("benchmarks/bench/loadgen.py",)
    if git("cat-file", "-e", f"{fix}^").returncode != 0 or git("diff", "--quiet", "HEAD", "--", *paths).returncode:
        pytest.skip("a shallow clone without the fix's parent, or loadgen.py changed and not committed")
    later = frozenset(git("log", "--format=%H", f"{fix}..HEAD", "--", *paths).stdout.split())
    assert fix in plan.NEUTRAL_COMMITS
    assert run.same_code(f"{fix}^", paths, neutral=later | {fix}) is True
    assert run.same_code(f"{fix}^", paths, neutral=later) is False


def test_server_timing_turns_on_the_header_in_every_ingress_and_the_benchs_reading() -> None:
    from benchmarks.routing_h2h.systems import with_server_timing

    base = yaml.safe_load((ROOT / "configs/gpu-routing.yaml").read_text())
    cfg = with_server_timing(system_config(base, "kv-aware", {}))
    assert load_app_config(cfg["applications"][0]["args"]).ingress.server_timing_header
    assert not load_app_config(base["applications"][0]["args"]).ingress.server_timing_header
    on = SimpleNamespace(client_processes=4, per_request=False, server_timing=True)
    assert run.client_flags(on) == ["--processes", "4", "--server-timing"]
    assert "--server-timing" not in run.client_flags(SimpleNamespace(client_processes=4))
    split = {"send": {"p50": 0.1, "mean": 0.2, "p99": 1.0}, "stages": {"engine": {"p50": 30.0, "mean": 31.0},
                                                                       "dispatch": None}}
    assert run.server_timing_brief(split) == {"send": {"p50": 0.1, "mean": 0.2},
                                              "stages": {"engine": {"p50": 30.0, "mean": 31.0}}}


def test_rates_from_a_committed_result_set_the_open_loop_levels(tmp_path: Path, monkeypatch) -> None:
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps({"calibration": {"docqa": 40.0}}))
    seen = {}

    def fake_system(name, cfg, scale, cells, doc, args, save=lambda new: None):
        seen["rate"] = run.rate_for(doc, "docqa", "r70")
        return {"routing": {}, "runs": [], "docqa": {}}

    monkeypatch.setattr(run, "run_system", fake_system)
    out = tmp_path / "out.json"
    argv = ["--config", "configs/gpu-routing.yaml", "--scale", "gpu", "--systems", "kv-aware", "--workloads", "docqa",
            "--loads", "r70", "--out", str(out), "--work-dir", str(tmp_path / "w"), "--git-commit", "abc"]
    with pytest.raises(SystemExit):  # no round-robin sat run and no rates: refused before anything starts
        run.main(argv)
    assert run.main([*argv, "--rates-from", str(kept)]) == 0
    doc = json.loads(out.read_text())
    assert seen["rate"] == 28.0 and doc["rates_from"] == [str(kept)] and doc["rates"]["docqa"]["r70"] == 28.0
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(SystemExit):
        run.main([*argv, "--rates-from", str(tmp_path / "empty.json")])
