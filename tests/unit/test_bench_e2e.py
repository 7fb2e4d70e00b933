"""End-to-end tests of ``kvserve bench`` against a tiny in-process fake OpenAI streaming server
(``fake_openai.FakeOpenAI``: timing, failure injection, a 16-token-block prefix cache).
"""

from __future__ import annotations

import asyncio
import json
from itertools import islice

import httpx
import pytest

from benchmarks.bench.client import StreamClient
from benchmarks.bench.loadgen import LoadSpec, run_load
from benchmarks.bench.stats import summarize
from benchmarks.bench.workloads import DocQAWorkload, MooncakeWorkload, MultiTurnWorkload, RandomWorkload

pytest.importorskip("aiohttp.web")
from tests.unit.fake_openai import FakeOpenAI  # after the skip: it needs aiohttp

pytestmark = pytest.mark.unit


async def bench(server, workload, spec, model="fake", warmup=0, server_timing=False):
    async with httpx.AsyncClient(timeout=30) as http:
        client = StreamClient(http, server.base_url, model, server_timing=server_timing)
        outcome = await run_load(client, workload.sessions(), spec, keep_text=workload.needs_answers,
                                 warmup=workload.warmup(warmup) if warmup else None)
    return outcome, summarize(outcome)


def max_in_flight(records) -> int:
    events = sorted([(r.start_s, 1) for r in records] + [(r.start_s + r.e2e_s, -1) for r in records])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


async def test_random_fixed_concurrency_measures_ttft_and_throughput():
    with FakeOpenAI(ttft_s=0.05, itl_s=0.002) as server:
        wl = RandomWorkload(input_len=64, output_len=10)
        outcome, s = await bench(server, wl, LoadSpec("concurrency", concurrency=4, num_requests=20), warmup=2)
    assert s["requests"]["completed"] == 20 and s["errors"]["total"] == 0 and s["requests"]["warmup"] == 2
    assert 45 <= s["ttft_ms"]["p50"] <= 1000 and s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
    assert 1.5 <= s["itl_ms"]["p50"] <= 200 and s["itl_ms"]["count"] == 20 * 9
    assert s["tokens"]["output_total"] == 200 and s["tokens"]["prompt_total"] == 20 * 64
    assert s["tokens"]["input_mismatch_requests"] == 0 and s["tokens"]["output_short_requests"] == 0
    assert s["throughput"]["output_tok_per_s"] == pytest.approx(200 / outcome.duration_s)
    assert 2 <= max_in_flight(outcome.records) <= 4  # closed loop at concurrency 4
    assert s["cache_hit_rate"] == 0.0
    bodies = [x["body"] for x in server.seen]
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} and b["ignore_eos"] for b in bodies)
    assert all(len(b["prompt"]) == 64 and b["max_tokens"] == 10 for b in bodies)


async def test_server_timing_splits_the_time_to_the_first_chunk_at_the_ingress():
    wl = RandomWorkload(input_len=16, output_len=3)
    with FakeOpenAI(ttft_s=0.08, server_timing=True) as server:
        outcome, s = await bench(server, wl, LoadSpec("concurrency", concurrency=2, num_requests=6),
                                 server_timing=True)
        _, plain = await bench(server, wl, LoadSpec("concurrency", concurrency=2, num_requests=2))
    split = s["server_timing_ms"]
    assert split["ingress"]["count"] == 6 and split["stages"]["engine"]["p50"] == pytest.approx(80)
    assert split["ingress"]["min"] >= 80
    for r in outcome.records:  # the parts add up to the client's time to its first chunk
        parts = r.accepted_s + r.server_ms["ingress"] / 1000
        assert 0 <= r.sent_s <= r.accepted_s < parts <= r.first_chunk_s + 1e-6
    assert 0 <= split["to_client"]["p50"] < 80 and 0 <= split["to_ingress"]["p50"] < 80
    assert "server_timing_ms" not in plain  # the bench reads the header only when asked


async def test_errors_are_counted_not_dropped():
    with FakeOpenAI(ttft_s=0.01, fail_every=5) as server:
        _, s = await bench(server, RandomWorkload(16, 4), LoadSpec("concurrency", concurrency=3, num_requests=20))
    assert s["requests"]["issued"] == 20 and s["requests"]["completed"] == 16
    assert s["errors"]["by_kind"] == {"http_500": 4}
    assert "injected failure" in s["errors"]["samples"][0]


@pytest.mark.parametrize("mode,kind", [("stream_error", "stream_error"), ("drop", "incomplete")])
async def test_broken_streams_are_errors(mode, kind):
    with FakeOpenAI(ttft_s=0.0, mode=mode) as server:
        _, s = await bench(server, RandomWorkload(16, 4), LoadSpec("concurrency", concurrency=2, num_requests=4))
    assert s["errors"]["by_kind"] == {kind: 4} and s["requests"]["completed"] == 0


async def test_unknown_model_and_unreachable_server():
    with FakeOpenAI() as server:
        _, s = await bench(server, RandomWorkload(16, 4), LoadSpec("concurrency", num_requests=2), model="other")
    assert s["errors"]["by_kind"] == {"http_404": 2}
    _, s = await bench(server, RandomWorkload(16, 4), LoadSpec("concurrency", num_requests=2))  # server stopped
    assert s["errors"]["by_kind"] == {"connect": 2}


async def test_docqa_cache_hits_vs_no_sharing_control():
    spec = LoadSpec("concurrency", concurrency=1, num_requests=12)
    params = {"num_docs": 2, "doc_tokens": (256, 256), "question_tokens": (8, 8), "output_len": 2}
    with FakeOpenAI(ttft_s=0.0, itl_s=0.0) as server:
        _, shared = await bench(server, DocQAWorkload(**params), spec)
    with FakeOpenAI(ttft_s=0.0, itl_s=0.0) as server:
        _, solo = await bench(server, DocQAWorkload(**params, no_sharing=True), spec)
    assert shared["cache_hit_rate"] > 0.7 and solo["cache_hit_rate"] == 0.0


async def test_multiturn_sessions_interleave_and_send_history():
    wl = MultiTurnWorkload(num_sessions=3, turns=3, system_words=10, user_words=(3, 3), output_len=3)
    with FakeOpenAI(ttft_s=0.0, itl_s=0.0) as server:
        _, s = await bench(server, wl, LoadSpec("concurrency", concurrency=1, num_requests=100, width=3))
    assert s["requests"]["completed"] == 9 and s["sessions"] == {"started": 3, "cut_by_error": 0}
    order = [x["session"] for x in server.seen]
    assert order[:3] == sorted(set(order)) and order[3:6] == order[:3]  # round-robin interleaving
    last = server.seen[-1]["body"]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert last[2]["content"] == "w0 w1 w2 " and all(x["path"] == "/v1/chat/completions" for x in server.seen)
    assert s["cache_hit_rate"] > 0.3


async def test_poisson_rate_and_duration_bound():
    with FakeOpenAI(ttft_s=0.0, itl_s=0.0) as server:
        outcome, s = await bench(server, RandomWorkload(16, 2), LoadSpec("rate", rate=200.0, duration_s=0.3))
    assert s["errors"]["total"] == 0 and 5 <= s["requests"]["completed"] <= 130  # about 60 expected
    assert max(r.start_s for r in outcome.records) < 0.3 + 0.25


async def test_open_loop_ends_when_its_sessions_run_out_under_an_eager_gather(monkeypatch):
    """Sessions that all end before the duration: the last answer drains the pool and the loop goes on to wait for
    that very request, already done but its done callbacks not yet run. Python 3.12's ``gather`` returns at once for
    done tasks, without yielding to the event loop (emulated here on any Python): waiting must still end."""
    real_gather, calls = asyncio.gather, 0

    def eager_gather(*aws):
        nonlocal calls
        calls += 1
        if calls > 1000:
            raise RuntimeError("drain spins: gather called 1000 times")
        if aws and all(isinstance(a, asyncio.Future) and a.done() for a in aws):
            done = asyncio.get_running_loop().create_future()
            done.set_result([a.result() for a in aws])
            return done
        return real_gather(*aws)

    monkeypatch.setattr(asyncio, "gather", eager_gather)
    wl = MultiTurnWorkload(num_sessions=4, turns=2, system_words=10, user_words=(3, 3), output_len=2)
    with FakeOpenAI(ttft_s=0.01, itl_s=0.0) as server:
        outcome, s = await bench(server, wl, LoadSpec("rate", rate=400.0, duration_s=20.0))
    assert s["requests"]["completed"] == 8 and s["errors"]["total"] == 0 and outcome.duration_s < 5


async def test_trace_replay_honours_scaled_timestamps(tmp_path):
    rows = [{"timestamp": t, "input_length": 1000, "output_length": 2, "hash_ids": [0, 1]}
            for t in (0, 500, 1000, 1500)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    wl = MooncakeWorkload(path=path, block_tokens=64, time_scale=5.0)
    assert [s.arrival_s for s in islice(wl.sessions(), 4)] == [0.0, 0.1, 0.2, 0.3]
    with FakeOpenAI(ttft_s=0.0, itl_s=0.0) as server:
        outcome, s = await bench(server, wl, LoadSpec("trace"))
    starts = sorted(r.start_s for r in outcome.records)
    assert s["requests"]["completed"] == 4
    # never early; late only by scheduling noise (the CI box may be busy)
    assert all(-0.005 <= a - b < 0.5 for a, b in zip(starts, [0.0, 0.1, 0.2, 0.3]))
    assert s["cache_hit_rate"] > 0.5  # later requests share blocks 0 and 1


def test_cli_run_writes_result_json_and_compare_plots(tmp_path, capsys):
    from benchmarks.cli import main

    outputs = []
    with FakeOpenAI(ttft_s=0.02, itl_s=0.001) as server:
        for c in (1, 4):
            out = tmp_path / f"c{c}.json"
            argv = ["bench", "--base-url", server.base_url, "--workload", "random", "--input-len", "32",
                    "--output-len", "4", "--concurrency", str(c), "--num-requests", "8", "--warmup", "2",
                    "--label", "fake", "--gpu-hour-usd", "3.6", "--gpus", "2", "-o", str(out)]
            assert main(argv) == 0
            outputs.append(out)
    result = json.loads(outputs[0].read_text())
    config = result["config"]
    assert config["model"] == "fake" and config["base_url"] == server.base_url and config["seed"] == 0
    assert config["workload"]["name"] == "random" and config["workload"]["input_len"] == 32
    assert config["load"] == {**config["load"], "mode": "concurrency", "concurrency": 1, "level": 1.0}
    assert config["command"].startswith("kvserve bench --base-url") and config["machine"]["hostname"]
    assert result["headline"]["completed"] == 8 and result["headline"]["errors"] == 0
    assert len(result["samples"]["ttft_ms"]) == 8 and result["summary"]["requests"]["warmup"] == 2
    assert set(result["summary"]["ttft_ms"]) >= {"p50", "p90", "p95", "p99", "mean"}
    assert result["headline"]["ttft_p95_ms"] is not None
    cost, summary = result["cost"], result["summary"]
    assert (cost["gpus"], cost["gpu_hour_usd"]) == (2, 3.6)
    assert cost["cost_usd"] == pytest.approx(2 * summary["duration_s"] / 1000, rel=1e-2, abs=1e-6)
    per_1k = 1000 / summary["tokens"]["output_total"]  # cost_usd is rounded to 1e-6 $, the per-1K figure is not
    assert cost["cost_per_1k_output_tokens_usd"] == pytest.approx(cost["cost_usd"] * per_1k, abs=0.5e-6 * per_1k + 1e-8)
    out_text = capsys.readouterr().out
    assert "TTFT p50" in out_text and "per 1K output tokens" in out_text
    assert config["workload"]["seed"] == "0/c1"  # prompts salted by load level:
    assert json.loads(outputs[1].read_text())["headline"]["cache_hit_rate"] == 0.0  # c=4 misses c=1's cache
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    assert main(["bench", "--compare", *map(str, outputs), "--plot-dir", str(plots)]) == 0
    table = (plots / "table.md").read_text()
    assert table.count("| fake | random |") == 2
    assert (plots / "ttft_cdf.png").stat().st_size > 0 and (plots / "ttft_p50_vs_load.png").stat().st_size > 0


def test_cli_rejects_a_negative_gpu_price(tmp_path, capsys):
    from benchmarks.cli import main

    argv = ["bench", "--base-url", "http://127.0.0.1:9/v1", "--num-requests", "1", "--gpu-hour-usd", "-1"]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: --gpu-hour-usd must be >= 0")


def test_cli_unknown_model_and_failing_warmup(tmp_path, capsys):
    from benchmarks.cli import main

    with FakeOpenAI(ttft_s=0.0, fail_every=1) as server:
        base = ["bench", "--base-url", server.base_url, "--num-requests", "2", "-o", str(tmp_path / "r.json")]
        assert main([*base, "--model", "nope"]) == 1
        assert "model 'nope' is not served" in capsys.readouterr().err
        assert main(base) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: all 4 warm-up requests failed") and err.count("\n") == 1


def test_cli_mooncake_replay_scaled(tmp_path):
    from benchmarks.cli import main

    rows = [{"timestamp": 200 * i, "input_length": 4096, "output_length": 300, "hash_ids": [0, i % 2, 10 + i]}
            for i in range(6)]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "m.json"
    with FakeOpenAI(ttft_s=0.0, itl_s=0.0) as server:
        assert main(["bench", "--base-url", server.base_url, "--workload", "mooncake", "--trace-file", str(trace),
                     "--block-tokens", "32", "--max-output-tokens", "3", "--time-scale", "4", "--num-requests", "5",
                     "--warmup", "0", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["load"]["mode"] == "trace" and result["config"]["workload"]["limit"] == 5
    assert result["headline"]["completed"] == 5 and result["summary"]["tokens"]["prompt_total"] == 5 * 256
    assert 0.1 < result["headline"]["cache_hit_rate"] < 0.5  # blocks 0 and i%2 shared, tails unique
    assert [len(x["body"]["prompt"]) for x in server.seen] == [256] * 5
