"""``benchmarks/routing_h2h/beside.py``: per request, the other requests in flight at its send and, from rows naming
their replica, the other replicas busy then and the requests on its own replica; the summary groups TTFT and TPOT by
those counts; the CLI reads bench JSONs and log archives, groups rows without replicas by what was in flight only and
says why when no row has a TTFT."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from benchmarks.routing_h2h.beside import beside, main, summarise

pytestmark = pytest.mark.unit


def _row(rep, start, e2e, ttft, ok=True, tokens=11):
    return {"replica": rep, "start_s": start, "e2e_s": e2e, "ttft_s": ttft, "ok": ok, "output_tokens": tokens}


ROWS = [
    _row("a", 0.0, 1.0, 0.05),   # alone
    _row("b", 0.5, 1.0, 0.08),   # a busy
    _row("a", 0.6, 0.2, 0.07),   # b busy, and a's first request on its own replica
    _row("c", 0.7, 0.1, 0.09),   # a and b busy
    _row("a", 2.0, 0.1, 0.04),   # everything done
    _row("b", 2.05, None, None, ok=False),  # failed: in flight nowhere, not measured
    _row(None, 2.06, 0.1, 0.04, tokens=1),  # no replica: in flight counted, no replica counts; one token: no TPOT
]


def test_each_request_counts_the_requests_in_flight_and_the_replicas_busy_beside_it_and_its_own():
    got = [(p["replica"], p["in_flight"], p["busy_others"], p["same"]) for p in beside(ROWS)]
    assert got == [("a", 0, 0, 0), ("b", 1, 1, 0), ("a", 2, 1, 1), ("c", 3, 2, 0), ("a", 0, 0, 0),
                   (None, 1, None, None)]
    assert beside(ROWS)[0]["tpot_ms"] == pytest.approx(95.0) and beside(ROWS)[-1]["tpot_ms"] is None


def test_the_summary_groups_ttft_and_tpot_by_the_counts():
    s = summarise(beside(ROWS))
    assert s["requests"] == 6 and s["named"] == 5 and s["busy_others_mean"] == pytest.approx(4 / 5)
    assert s["in_flight_mean"] == pytest.approx(7 / 6, abs=1e-3)
    assert s["by_in_flight"]["1"] == {"n": 2, "ttft_p50_ms": 60.0, "ttft_mean_ms": 60.0, "tpot_p50_ms": 92.0,
                                      "stacked": 0, "stacked_ttft_p50_ms": None}
    assert s["by_in_flight"]["2"]["stacked"] == 1 and s["by_in_flight"]["2"]["stacked_ttft_p50_ms"] == 70.0
    unnamed = summarise(beside([dict(r, replica=None) for r in ROWS]))
    assert "stacked" not in unnamed["by_in_flight"]["1"] and unnamed["busy_others_mean"] is None
    assert s["by_busy_others"]["0"] == {"n": 2, "ttft_p50_ms": 45.0, "ttft_mean_ms": 45.0, "tpot_p50_ms": 50.5}
    assert s["by_busy_others"]["2"]["n"] == 1 and s["by_busy_others"]["2"]["ttft_p50_ms"] == 90.0
    assert s["by_same_replica"]["1"] == {"n": 1, "ttft_p50_ms": 70.0, "ttft_mean_ms": 70.0, "tpot_p50_ms": 13.0}


def test_the_cli_reads_each_run_of_a_cell_and_groups_rows_without_replicas_by_what_was_in_flight(tmp_path, capsys):
    archive = tmp_path / "logs.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, doc in (("a/kv-aware-no-sharing-r25.json", {"requests": ROWS}),
                          ("b/kv-aware-no-sharing-r25.json", {"requests": ROWS[:2]}),
                          ("a/round-robin-no-sharing-r25.json", {"requests": [dict(r, replica=None) for r in ROWS]})):
            data = json.dumps(doc).encode()
            info = tarfile.TarInfo(f"./work/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "beside.json"
    assert main([str(archive), "--cell", "kv-aware-no-sharing-r25", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["results"]) == ["logs.tgz:work/a/kv-aware-no-sharing-r25.json",
                                    "logs.tgz:work/b/kv-aware-no-sharing-r25.json"] and doc["skipped"] == []
    assert doc["results"]["logs.tgz:work/b/kv-aware-no-sharing-r25.json"]["requests"] == 2  # one run each
    assert "other replicas busy" in capsys.readouterr().out
    assert main([str(archive), "--cell", "round-robin-no-sharing-r25"]) == 0
    printed = capsys.readouterr().out
    assert "others in flight" in printed and "expose_replica_header" in printed
    (tmp_path / "none.json").write_text('{"requests": []}')
    assert main([str(tmp_path / "none.json")]) == 2
    assert "no per-request rows with a TTFT" in capsys.readouterr().err
