"""Unit tests of splitting a bench run across client processes (pure): shares, shards, merge.

``--processes N`` must offer the same load as one process: the shares add up, every session is in
exactly one process with its prompts and times unchanged, the rate parts superpose to the full rate,
and the merged outcome's statistics are computed over every record (never averaged per process).
"""

from __future__ import annotations

import json
import random
from itertools import islice, pairwise

import pytest

from benchmarks.bench.client import RequestRecord
from benchmarks.bench.loadgen import LoadSpec, RunOutcome, _poisson
from benchmarks.bench.spec import WHOLE, Shard
from benchmarks.bench.split import PartResult, check_split, deal, merge_parts, split_evenly, split_load
from benchmarks.bench.stats import percentile, summarize
from benchmarks.bench.workloads import DocQAWorkload, MooncakeWorkload, MultiTurnWorkload, RandomWorkload

pytestmark = pytest.mark.unit


def test_split_evenly_gives_the_remainder_to_the_first_parts():
    assert split_evenly(64, 3) == [22, 21, 21]
    assert split_evenly(64, 2) == [32, 32]
    assert split_evenly(5, 5) == [1, 1, 1, 1, 1]
    assert split_evenly(4, 3) == [2, 1, 1]
    assert split_evenly(0, 2) == [0, 0]
    with pytest.raises(ValueError):
        split_evenly(4, 0)


def test_closed_loop_split_keeps_the_total_load_and_deals_sessions():
    spec = LoadSpec("concurrency", concurrency=64, num_requests=1000, duration_s=30.0, warmup=4, seed=3)
    parts = split_load(spec, 3)
    assert [p.concurrency for p in parts] == [22, 21, 21]
    assert [p.num_requests for p in parts] == [334, 333, 333]
    assert [p.warmup for p in parts] == [2, 1, 1]
    assert [p.session_width for p in parts] == [22, 21, 21]  # the run's width, max(16, 64), cut
    assert [p.shard for p in parts] == [Shard(0, 3), Shard(1, 3), Shard(2, 3)]
    assert all(p.duration_s == 30.0 and p.mode == "concurrency" and p.seed == 3 for p in parts)
    assert split_load(spec, 1) == [spec]


def test_small_concurrency_keeps_the_default_session_width_of_one_process():
    parts = split_load(LoadSpec("concurrency", concurrency=4, num_requests=8), 2)
    assert sum(p.session_width for p in parts) == LoadSpec("concurrency", concurrency=4).session_width == 16


def test_rate_split_gives_each_process_its_own_arrivals_that_superpose_to_the_rate():
    spec = LoadSpec("rate", rate=8.0, duration_s=60.0, max_inflight=10, seed=5)
    parts = split_load(spec, 4)
    assert [p.rate for p in parts] == [2.0] * 4 and [p.max_inflight for p in parts] == [3, 3, 2, 2]
    keys = {p.arrivals_key for p in parts}
    assert len(keys) == 4 and spec.arrivals_key == "5/arrivals" and spec.arrivals_key not in keys
    horizon = 2000.0
    merged = sorted(t for p in parts
                    for t in _take_until(_poisson(p.rate, random.Random(p.arrivals_key)), horizon))
    # the union is Poisson at the full rate: count within 3 sigma (sqrt(16000) ~ 126), exponential gaps (CV 1)
    assert abs(len(merged) - 8.0 * horizon) < 400
    gaps = [b - a for a, b in pairwise(merged)]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert mean == pytest.approx(1 / 8.0, rel=0.05) and cv == pytest.approx(1.0, abs=0.05)


def _take_until(times, horizon):
    for t in times:
        if t >= horizon:
            return
        yield t


def test_trace_split_keeps_the_mode_and_deals_lines():
    parts = split_load(LoadSpec("trace", num_requests=7), 2)
    assert [(p.mode, p.num_requests, p.shard) for p in parts] == [("trace", 4, Shard(0, 2)), ("trace", 3, Shard(1, 2))]


@pytest.mark.parametrize("spec,processes,flag", [
    (LoadSpec("concurrency", concurrency=2, num_requests=10), 3, "--concurrency"),
    (LoadSpec("rate", rate=4.0, num_requests=2), 3, "--num-requests"),
    (LoadSpec("rate", rate=4.0, duration_s=5.0, max_inflight=1), 2, "--max-inflight"),
    (LoadSpec("concurrency", concurrency=8, duration_s=5.0, width=2), 4, "--session-width"),
    (LoadSpec("concurrency", concurrency=8, duration_s=5.0), 0, "--processes must be >= 1"),
])
def test_a_split_that_leaves_a_process_idle_is_refused(spec, processes, flag):
    with pytest.raises(ValueError, match=flag):
        check_split(spec, processes)


def test_warmup_requests_are_dealt_round_robin():
    requests = RandomWorkload(8, 2).warmup(5)
    assert [r.tag for r in deal(requests, Shard(0, 2))] == ["warmup/0", "warmup/2", "warmup/4"]
    assert [r.tag for r in deal(requests, Shard(1, 2))] == ["warmup/1", "warmup/3"]
    assert deal(requests, WHOLE) == requests


def _trace(tmp_path, n):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps({"timestamp": 250 * i, "input_length": 1024, "output_length": 3,
                                        "hash_ids": [0, i]}) + "\n" for i in range(n)))
    return path


def _first_turns(sessions):
    return [(s.session_id, s.arrival_s, s.next_request(None)) for s in sessions]


@pytest.mark.parametrize("make", [
    lambda tmp: RandomWorkload(16, 2, seed=9),
    lambda tmp: DocQAWorkload(num_docs=3, doc_tokens=(32, 64), question_tokens=(4, 8), seed=9),
    lambda tmp: MultiTurnWorkload(num_sessions=0, turns=2, system_words=5, user_words=(2, 4), seed=9),
    lambda tmp: MooncakeWorkload(path=_trace(tmp, 12), block_tokens=8, time_scale=2.0),
])
def test_shards_deal_the_whole_session_stream_disjointly_and_unchanged(make, tmp_path):
    whole = _first_turns(islice(make(tmp_path).sessions(), 12))
    shards = [_first_turns(islice(make(tmp_path).sessions(Shard(k, 3)), 4)) for k in range(3)]
    for k, part in enumerate(shards):
        assert part == whole[k::3]  # same session ids, arrival times and prompts, every third from k
    assert len({(sid, r.tag, str(r.prompt or r.messages)) for sid, _, r in whole}) == 12


def test_a_multiturn_session_keeps_all_its_turns_in_one_shard():
    wl = MultiTurnWorkload(num_sessions=7, turns=3, system_words=5, user_words=(2, 2))
    owners = {}
    for k in range(3):
        for session in wl.sessions(Shard(k, 3)):
            turns = 0
            while session.next_request("answer" if turns else None) is not None:
                turns += 1
            assert turns == 3
            assert owners.setdefault(session.session_id, k) == k
    assert sorted(owners) == sorted(s.session_id for s in wl.sessions())


def _record(start_s, ttft_ms, e2e_ms, out=4, ok=True):
    record = RequestRecord(start_s=start_s, max_tokens=out, ok=ok, ttft_s=ttft_ms / 1000, first_chunk_s=ttft_ms / 1000,
                           e2e_s=e2e_ms / 1000 if ok else None, prompt_tokens=10, output_tokens=out if ok else None,
                           usage_reported=ok, error=None if ok else "http_500")
    return record


def _part(index, wall, records, duration, cpu, lag, started=0):
    outcome = RunOutcome(records=records, duration_s=duration, client_cpu_s=cpu, max_lag_s=lag,
                         sessions_started=started or len(records), warmup_records=[_record(0.0, 1, 2)])
    return PartResult(index, outcome, wall)


def test_merge_puts_every_record_on_one_clock_and_sums_or_maxes_the_client_figures():
    a = _part(0, 1000.25, [_record(0.0, 10, 50), _record(0.1, 20, 60), _record(0.2, 30, 70)], 1.0, 0.4, 0.003)
    b = _part(1, 1000.0, [_record(0.0, 100, 300), _record(0.05, 200, 400), _record(0.3, 0, 0, ok=False)], 1.5, 0.7,
              0.009)
    merged = merge_parts([a, b])
    assert len(merged.records) == 6 and len(merged.warmup_records) == 2
    assert sorted(round(r.start_s, 3) for r in merged.records) == [0.0, 0.05, 0.25, 0.3, 0.35, 0.45]
    ends = [r.start_s + (r.e2e_s or 0.0) for r in merged.records]
    assert ends == sorted(ends)  # completion order, as one process appends them
    assert merged.duration_s == pytest.approx(1.5)  # union: b from 0 to 1.5, a from 0.25 to 1.25
    assert merged.client_cpu_s == pytest.approx(1.1) and merged.max_lag_s == 0.009
    assert merged.sessions_started == 6
    assert [(p["index"], p["requests"], p["start_offset_ms"]) for p in merged.processes] == [(0, 3, 250.0), (1, 3, 0.0)]
    assert merged.processes[0]["cpu_util"] == pytest.approx(0.4) and merged.processes[1]["max_schedule_lag_ms"] == 9.0


def test_statistics_of_a_merged_run_are_over_all_records_not_averaged():
    a = _part(0, 0.0, [_record(0.0, t, t + 40) for t in (10, 20, 30)], 2.0, 0.5, 0.001)
    b = _part(1, 0.0, [_record(0.0, t, t + 40) for t in (100, 200)], 2.0, 0.5, 0.002)
    s = summarize(merge_parts([a, b]))
    ttfts = [10, 20, 30, 100, 200]
    assert s["ttft_ms"]["p50"] == pytest.approx(30.0)  # the averaged p50s would give 85
    assert s["ttft_ms"]["p90"] == pytest.approx(percentile(ttfts, 90)) and s["ttft_ms"]["count"] == 5
    assert s["requests"]["completed"] == 5 and s["throughput"]["output_tok_per_s"] == pytest.approx(20 / 2.0)
    client = s["client"]
    assert client["cpu_s"] == 1.0 and client["cpu_util"] == pytest.approx(0.5)
    assert client["max_schedule_lag_ms"] == pytest.approx(2.0) and len(client["processes"]) == 2


def test_one_process_summary_has_no_per_process_entries():
    s = summarize(RunOutcome(records=[_record(0.0, 10, 20)], duration_s=1.0, client_cpu_s=0.2))
    assert set(s["client"]) == {"cpu_s", "cpu_util", "max_schedule_lag_ms"}
