"""``benchmarks/routing_h2h/beside.py``: per request, the other replicas busy at its send and the requests on its own
replica, from per-request rows naming their replica; the summary groups TTFT by those counts; the CLI reads bench
JSONs and log archives and says why when no row names a replica."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from benchmarks.routing_h2h.beside import beside, main, summarise

pytestmark = pytest.mark.unit


def _row(rep, start, e2e, ttft, ok=True):
    return {"replica": rep, "start_s": start, "e2e_s": e2e, "ttft_s": ttft, "ok": ok}


ROWS = [
    _row("a", 0.0, 1.0, 0.05),   # alone
    _row("b", 0.5, 1.0, 0.08),   # a busy
    _row("a", 0.6, 0.2, 0.07),   # b busy, and a's first request on its own replica
    _row("c", 0.7, 0.1, 0.09),   # a and b busy
    _row("a", 2.0, 0.1, 0.04),   # everything done
    _row("b", 2.05, None, None, ok=False),  # failed: in flight nowhere, not measured
    _row(None, 2.06, 0.1, 0.04),  # no replica: not measured
]


def test_each_request_counts_the_replicas_busy_beside_it_and_its_own():
    got = [(p["replica"], p["busy_others"], p["same"]) for p in beside(ROWS)]
    assert got == [("a", 0, 0), ("b", 1, 0), ("a", 1, 1), ("c", 2, 0), ("a", 0, 0)]


def test_the_summary_groups_ttft_by_the_counts():
    s = summarise(beside(ROWS))
    assert s["requests"] == 5 and s["busy_others_mean"] == pytest.approx(4 / 5)
    assert s["by_busy_others"]["0"] == {"n": 2, "ttft_p50_ms": 45.0, "ttft_mean_ms": 45.0}
    assert s["by_busy_others"]["2"]["n"] == 1 and s["by_busy_others"]["2"]["ttft_p50_ms"] == 90.0
    assert s["by_same_replica"]["1"] == {"n": 1, "ttft_p50_ms": 70.0, "ttft_mean_ms": 70.0}


def test_the_cli_reads_archives_by_cell_and_refuses_rows_without_replicas(tmp_path, capsys):
    archive = tmp_path / "logs.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, doc in (("kv-aware-no-sharing-r25.json", {"requests": ROWS}),
                          ("round-robin-no-sharing-r25.json", {"requests": [dict(r, replica=None) for r in ROWS]})):
            data = json.dumps(doc).encode()
            info = tarfile.TarInfo(f"./work/routing_h2h/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "beside.json"
    assert main([str(archive), "--cell", "kv-aware-no-sharing-r25", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["results"]) == ["logs.tgz:kv-aware-no-sharing-r25.json"] and doc["skipped"] == []
    assert "other replicas busy" in capsys.readouterr().out
    assert main([str(archive), "--cell", "round-robin-no-sharing-r25"]) == 2
    assert "expose_replica_header" in capsys.readouterr().err
