"""Unit tests of the benchmark statistics: percentiles, distributions and the run summary."""

from __future__ import annotations

import pytest

from benchmarks.bench.client import RequestRecord
from benchmarks.bench.loadgen import RunOutcome
from benchmarks.bench.stats import distribution, headline, percentile, summarize

pytestmark = pytest.mark.unit


def test_percentile_linear_interpolation_matches_numpy_default():
    values = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(values, 0) == 15.0 and percentile(values, 100) == 50.0
    assert percentile(values, 50) == 35.0
    assert percentile(values, 40) == pytest.approx(29.0)
    assert percentile([3.0], 99) == 3.0
    assert percentile(list(range(1, 101)), 90) == pytest.approx(90.1)
    np = pytest.importorskip("numpy")
    data = [((i * 7919) % 1000) / 7.0 for i in range(333)]
    for q in (1, 50, 90, 99):
        assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)))
    with pytest.raises(ValueError):
        percentile([], 50)


def test_distribution_in_ms():
    d = distribution([0.010, 0.020, 0.030])
    assert d["p50"] == pytest.approx(20.0) and d["mean"] == pytest.approx(20.0) and d["count"] == 3
    assert distribution([]) is None


def ok_record(ttft, e2e, prompt, out, cached=None, itl=()):
    r = RequestRecord(start_s=0.0, max_tokens=out, input_tokens=prompt, ok=True, ttft_s=ttft, first_chunk_s=ttft,
                      e2e_s=e2e, prompt_tokens=prompt, output_tokens=out, cached_tokens=cached, usage_reported=True)
    r.itl_s.extend(itl)
    return r


def test_summary_throughput_cache_hits_and_errors():
    records = [
        ok_record(0.1, 1.1, 1000, 11, cached=500, itl=[0.1] * 10),
        ok_record(0.3, 1.3, 1000, 11, cached=0, itl=[0.1] * 10),
        ok_record(0.2, 1.2, 2000, 11, cached=None),
        RequestRecord(start_s=0.0, max_tokens=11, error="http_503", status=503, detail="overloaded"),
        RequestRecord(start_s=0.0, max_tokens=11, error="timeout", detail="slow"),
    ]
    s = summarize(RunOutcome(records=records, duration_s=2.0, client_cpu_s=0.5))
    assert s["requests"] == {"issued": 5, "completed": 3, "failed": 2, "warmup": 0, "warmup_failed": 0}
    assert s["errors"]["by_kind"] == {"http_503": 1, "timeout": 1} and s["errors"]["total"] == 2
    assert s["errors"]["samples"][0] == "http_503: overloaded"
    assert s["throughput"]["output_tok_per_s"] == pytest.approx(33 / 2.0)
    assert s["throughput"]["requests_per_s"] == pytest.approx(1.5)
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert s["itl_ms"]["count"] == 20
    assert s["cache_hit_rate"] == pytest.approx(500 / 2000)  # only requests that reported cached tokens
    assert s["tokens"]["cached_reported_requests"] == 2 and s["client"]["cpu_util"] == pytest.approx(0.25)
    h = headline(s)
    assert h["ttft_p50_ms"] == pytest.approx(200.0) and h["errors"] == 2 and h["completed"] == 3


def test_summary_without_cached_reports_or_successes():
    s = summarize(RunOutcome(records=[ok_record(0.1, 0.2, 10, 2)], duration_s=1.0))
    assert s["cache_hit_rate"] is None
    empty = summarize(RunOutcome(records=[RequestRecord(start_s=0, max_tokens=1, error="connect")], duration_s=1.0))
    assert empty["ttft_ms"] is None and headline(empty)["ttft_p50_ms"] is None
