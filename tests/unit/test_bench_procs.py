"""End-to-end tests of ``bench --processes N`` against the fake OpenAI streaming server, and of the
closed-loop schedule lag (the client's own delay, which several processes exist to keep low).

The fake server runs in a thread of the test process; the client processes are spawned and reach it
over 127.0.0.1, as they would reach a real server.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from benchmarks.bench.client import ClientSettings, RequestRecord
from benchmarks.bench.loadgen import LoadSpec, run_load
from benchmarks.bench.procs import ClientProcessError, run_processes
from benchmarks.bench.split import split_load
from benchmarks.bench.stats import percentile
from benchmarks.bench.workloads import MooncakeWorkload, RandomWorkload
from benchmarks.cli import main

pytest.importorskip("aiohttp.web")
from tests.unit.fake_openai import FakeOpenAI  # after the skip: it needs aiohttp

pytestmark = pytest.mark.unit


def _bench(server, tmp_path, *flags):
    out = tmp_path / "r.json"
    argv = ["bench", "--base-url", server.base_url, "--label", "fake", "--per-request", "-o", str(out), *flags]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_two_processes_send_every_request_once_and_merge_one_result(tmp_path, capsys):
    with FakeOpenAI(ttft_s=0.02, itl_s=0.001) as server:
        result = _bench(server, tmp_path, "--workload", "random", "--input-len", "16", "--output-len", "4",
                        "--concurrency", "4", "--num-requests", "21", "--warmup", "3", "--processes", "2")
        sent = [x["body"]["prompt"] for x in server.seen]
    rows = result["requests"]
    assert sorted(r["tag"] for r in rows) == sorted(f"random/{i}" for i in range(21))  # the 1-process requests
    assert len(sent) == 24 and len({tuple(p) for p in sent}) == 24  # 21 measured + 3 warm-up, none twice
    s, h = result["summary"], result["headline"]
    assert s["requests"] == {"issued": 21, "completed": 21, "failed": 0, "warmup": 3, "warmup_failed": 0}
    ttfts = [r["ttft_s"] * 1000 for r in rows]
    for q in (50, 90, 99):
        assert s["ttft_ms"][f"p{q}"] == pytest.approx(percentile(ttfts, q))
    assert sorted(result["samples"]["ttft_ms"]) == pytest.approx(sorted(ttfts), abs=1e-3)
    assert s["itl_ms"]["count"] == 21 * 3 and s["tokens"]["output_total"] == 84
    assert h["output_tok_per_s"] == pytest.approx(84 / s["duration_s"])
    assert s["duration_s"] >= max(r["start_s"] + r["e2e_s"] for r in rows) - 1e-6
    client, procs = s["client"], s["client"]["processes"]
    assert all(p["start_offset_ms"] < 100 for p in procs)  # both start together, on one clock
    assert [p["requests"] for p in procs] == [11, 10]
    assert client["cpu_s"] == pytest.approx(sum(p["cpu_s"] for p in procs))
    assert client["max_schedule_lag_ms"] == max(p["max_schedule_lag_ms"] for p in procs) > 0
    assert result["config"]["client"]["processes"] == 2 and "--processes 2" in result["config"]["command"]
    assert result["config"]["load"]["concurrency"] == 4
    assert "in 2 processes" in capsys.readouterr().out


def test_each_request_records_the_replica_its_answer_named(tmp_path):
    with FakeOpenAI(ttft_s=0.0, itl_s=0.0, replicas=("r-a", "r-b", "r-c")) as server:
        named = _bench(server, tmp_path, "--workload", "random", "--input-len", "16", "--output-len", "2",
                       "--concurrency", "2", "--num-requests", "9", "--warmup", "0", "--processes", "2")
    assert sorted(r["replica"] for r in named["requests"]) == ["r-a"] * 3 + ["r-b"] * 3 + ["r-c"] * 3
    with FakeOpenAI(ttft_s=0.0, itl_s=0.0) as server:  # a server without kvserve's header: none recorded
        plain = _bench(server, tmp_path, "--workload", "random", "--input-len", "16", "--output-len", "2",
                       "--concurrency", "1", "--num-requests", "2", "--warmup", "0")
    assert [r["replica"] for r in plain["requests"]] == [None, None]


def test_two_processes_replay_a_trace_at_its_times(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": 100 * i, "input_length": 1024, "output_length": 2,
                                         "hash_ids": [0, i]}) + "\n" for i in range(6)))
    with FakeOpenAI(ttft_s=0.0, itl_s=0.0) as server:
        result = _bench(server, tmp_path, "--workload", "mooncake", "--trace-file", str(trace), "--block-tokens", "16",
                        "--warmup", "0", "--processes", "2")
    starts = sorted(r["start_s"] for r in result["requests"])
    assert result["headline"]["completed"] == 6 and result["config"]["load"]["mode"] == "trace"
    # each line at its own time (0.0, 0.1, ...), whichever process sent it: never early, late by noise only
    assert all(-0.005 <= got - due < 0.3 for got, due in zip(starts, [0.1 * i for i in range(6)], strict=True))
    assert [p["requests"] for p in result["summary"]["client"]["processes"]] == [3, 3]


def test_a_failing_process_ends_the_run_with_its_error(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"timestamp": 0, "input_length": 16, "output_length": 1, "hash_ids": [0]}) + "\n")
    workload = MooncakeWorkload(path=trace, block_tokens=16)
    trace.unlink()  # the processes cannot read it
    specs = split_load(LoadSpec("trace", num_requests=2), 2)
    start = time.monotonic()
    with pytest.raises(ClientProcessError, match="client process [01] failed: .*FileNotFoundError"):
        run_processes(workload, specs, [], ClientSettings("http://127.0.0.1:9/v1", "m"), keep_text=False)
    assert time.monotonic() - start < 60


class _HoggingClient:
    """Answers each request in 10 ms, then blocks the event loop 30 ms (a client busy after ``[DONE]``)."""

    async def send(self, request, run_start, keep_text=False):
        t0 = time.perf_counter()
        await asyncio.sleep(0.01)
        record = RequestRecord(start_s=t0 - run_start, max_tokens=request.max_tokens, ok=True,
                               e2e_s=time.perf_counter() - t0)
        time.sleep(0.03)  # noqa: ASYNC251 - the point: the loop is blocked
        return record


async def test_closed_loop_reports_how_late_the_client_sent_after_a_slot_freed():
    outcome = await run_load(_HoggingClient(), RandomWorkload(8, 2).sessions(),
                             LoadSpec("concurrency", concurrency=1, num_requests=4), keep_text=False)
    assert len(outcome.records) == 4
    assert 0.03 <= outcome.max_lag_s < 0.5
