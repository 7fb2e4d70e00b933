"""Unit tests of the ``bench`` CLI's argument handling and error messages (no server needed)."""

from __future__ import annotations

import json
import socket

import pytest

from benchmarks.bench.compare import load_results, markdown_table
from benchmarks.cli import main

pytestmark = pytest.mark.unit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags,message", [
    (["--concurrency", "1", "--rate", "2", "--num-requests", "1"], "choose one load mode"),
    (["--num-requests", "1", "--vocab-range", "5:2"], "--vocab-range must be"),
    (["--num-requests", "1", "--vocab-range", "7"], "LO < HI"),
    (["--workload", "docqa", "--num-requests", "1", "--doc-tokens", "x"], "--doc-tokens must be"),
    (["--concurrency", "0", "--num-requests", "1"], "--concurrency must be >= 1"),
    (["--rate", "-1", "--num-requests", "1"], "--rate must be > 0"),
    (["--concurrency", "4"], "bound the run with --num-requests or --duration"),
    (["--trace", "--num-requests", "1"], "--trace needs a timed workload"),
    (["--workload", "mooncake", "--trace-file", "/nonexistent.jsonl"], "trace file not found"),
    (["--num-requests", "1", "--extra-body", "[1]"], "--extra-body must be a JSON object"),
    (["--num-requests", "1", "--header", "novalue"], "--header must be NAME:VALUE"),
    (["--num-requests", "4", "--processes", "0"], "--processes must be >= 1"),
    (["--concurrency", "2", "--num-requests", "8", "--processes", "3"], "--processes 3 needs --concurrency >= 3"),
    (["--rate", "5", "--num-requests", "2", "--processes", "3"], "needs --num-requests >= 3"),
])
def test_bad_flags_give_one_line_error_and_exit_2(flags, message, capsys):
    assert main(["bench", "--base-url", "http://127.0.0.1:1/v1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_argparse_rejects_unknown_workload():
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--workload", "nope"])
    assert exc.value.code == 2


def test_unreachable_server_is_one_line_error_exit_1(capsys, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    out = tmp_path / "r.json"
    assert main(["bench", "--base-url", url, "--num-requests", "1", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach {url}/models: ConnectError") and err.count("\n") == 1
    assert not out.exists()


def test_compare_rejects_foreign_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert main(["bench", "--compare", str(bad), str(tmp_path / "missing.json")]) == 2
    assert "is not a kvserve bench result" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cannot read"):
        load_results([tmp_path / "missing.json"])


def test_markdown_table_rows():
    def result(label, c, p50):
        return {"label": label, "config": {"workload": {"name": "random"}, "load": {"mode": "concurrency", "level": c}},
                "headline": {"completed": 10, "errors": 1, "ttft_p50_ms": p50, "ttft_p90_ms": None, "ttft_p99_ms": 3.0,
                             "itl_p50_ms": 1.234, "e2e_p50_ms": 9.0, "output_tok_per_s": 100.0, "requests_per_s": 2.0,
                             "cache_hit_rate": 0.5}}

    lines = markdown_table([result("b", 64, 20.0), result("a", 1, 10.0)]).splitlines()
    assert lines[0].startswith("| system | workload | load |") and lines[1].count("---") == 13
    assert lines[2] == "| a | random | c1 | 10 | 1 | 10.0 | - | 3.0 | 1.23 | 9.0 | 100.0 | 2.00 | 50.0% |"
    assert lines[3].startswith("| b | random | c64 |")
