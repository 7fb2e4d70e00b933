"""The AIPerf Mooncake replay (benchmarks/routing_h2h/aiperf_replay.py): trace scaling into AIPerf's
``mooncake_trace`` rows, the command, reading AIPerf's export, the ratios. Pure and fast (no AIPerf, no Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.routing_h2h import aiperf_replay as ar


def _rec(t_ms: int, n_in: int, n_out: int, ids: list[int]) -> dict:
    return {"timestamp": t_ms, "input_length": n_in, "output_length": n_out, "hash_ids": ids}


TRACE = [_rec(0, 6758, 500, list(range(14))), _rec(0, 7322, 490, [0, *range(14, 28)]),
         _rec(3000, 2290, 316, [0, 42, 43, 44, 45]), _rec(6000, 512, 3, [0]),
         _rec(9000, 120633, 300, list(range(100, 336)))]


def _layout_ok(row: dict, block: int) -> bool:
    """AIPerf's accepted layouts: last block partial or exact tile ((m - 1) * b < n <= m * b)."""
    m = len(row["hash_ids"])
    return (m - 1) * block < row["input_length"] <= m * block


@pytest.mark.parametrize("block", [8, 16, 32, 64, 512])
def test_scaled_rows_keep_the_block_layout_aiperf_requires(block: int) -> None:
    rows, _ = ar.scale_trace(TRACE, block_tokens=block, max_input_tokens=2048, output_scale=1 / 32,
                             max_output_tokens=16, rate=1.0)
    for rec, row in zip(TRACE, rows, strict=True):
        assert _layout_ok(rec, 512)  # the real trace's lines satisfy it
        assert _layout_ok(row, block), (block, row["input_length"], len(row["hash_ids"]))
        assert row["hash_ids"] == rec["hash_ids"][:len(row["hash_ids"])]  # a prefix of the original ids
        assert 1 <= row["output_length"] <= 16


def test_lengths_scale_by_block_ratio_and_cap() -> None:
    row = ar.scale_record(_rec(0, 6758, 500, list(range(14))), 16, 2048, 1 / 32, 16)
    assert row == {"input_length": math.ceil(6758 / 32), "output_length": 16, "hash_ids": list(range(14))}
    capped = ar.scale_record(TRACE[-1], 16, 2048, 1 / 32, 16)  # 120,633 tokens -> 3,770 -> capped at 2,048
    assert capped["input_length"] == 2048 and capped["hash_ids"] == list(range(100, 228))
    assert ar.scale_record(_rec(0, 10, 3, [7]), 16, None, 1 / 32, None) == {
        "input_length": 1, "output_length": 1, "hash_ids": [7]}  # at least one token each way
    with pytest.raises(ValueError):
        ar.scale_record(TRACE[0], 0, None, 1.0, None)


def test_timestamps_are_stretched_to_the_target_rate_and_start_at_zero() -> None:
    records = [_rec(5000 + 1000 * i, 600, 10, [0, i + 1]) for i in range(11)]  # 1 req/s over 10 s
    rows, sc = ar.scale_trace(records, block_tokens=16, max_input_tokens=None, output_scale=1.0,
                              max_output_tokens=None, rate=0.5)
    assert [r["timestamp"] for r in rows] == [2000.0 * i for i in range(11)]  # twice as slow, from 0
    assert sc["trace_rate_per_s"] == 1.0 and sc["time_scale"] == 0.5 and sc["timestamp_stretch"] == 2.0
    assert sc["replay_span_s"] == 20.0 and sc["requests"] == 11
    assert (len(rows) - 1) / sc["replay_span_s"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ar.scale_trace(records[:1], block_tokens=16, max_input_tokens=None, output_scale=1.0,
                       max_output_tokens=None, rate=1.0)  # one line has no rate


def test_scaling_record_and_prefix_sharing() -> None:
    _, sc = ar.scale_trace(TRACE, block_tokens=16, max_input_tokens=2048, output_scale=1 / 32, max_output_tokens=16,
                           rate=1.0)
    assert sc["inputs_capped"] == 1 and sc["input_tokens_max"] == 2048 and sc["input_scale"] == 1 / 32
    # blocks extending an earlier prefix: [0] in rows 2, 3, 4 -> 3 of 14 + 15 + 5 + 1 + 128 blocks
    assert sc["prefix_shared_block_fraction"] == round(3 / (14 + 15 + 5 + 1 + 128), 4)
    # [2] is no prefix seen
    assert ar.prefix_shared_fraction([{"hash_ids": [1, 2]}, {"hash_ids": [1, 2, 3]}, {"hash_ids": [2]}]) == 0.3333
    assert ar.prefix_shared_fraction([]) == 0.0


def test_real_trace_head_converts(tmp_path: Path) -> None:
    from serve_app import settings

    trace = settings.mooncake_trace()
    if not trace.is_file():
        pytest.skip(f"no Mooncake trace at {trace}")
    records = ar.read_trace(trace, 50)
    rows, _ = ar.scale_trace(records, **{k: v for k, v in ar.CPU_DEFAULTS.items() if k != "requests"})
    assert len(rows) == 50 and all(_layout_ok(r, 16) for r in rows)
    lines = ar.write_jsonl(rows, tmp_path / "t.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == rows[0] and set(rows[0]) == {"timestamp", "input_length", "output_length",
                                                                "hash_ids"}


def test_read_trace_skips_blank_lines_and_honours_start(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 1 else "") for i, r in enumerate(TRACE)))
    assert ar.read_trace(path, 3) == TRACE[:3]
    assert ar.read_trace(path, 2, start=3) == TRACE[2:4]  # line 2 is blank


def test_command_replays_the_file_on_a_fixed_schedule() -> None:
    cmd = ar.aiperf_command("aiperf", url="http://127.0.0.1:8000", model="smollm2", tokenizer="tok",
                            input_file=Path("/w/in.jsonl"), block_tokens=16, artifact_dir=Path("/w/a"), api_key="k")
    text = " ".join(cmd)
    for part in ("--custom-dataset-type mooncake_trace", "--fixed-schedule", "--isl-block-size 16",
                 "--endpoint-type chat", "--streaming", "--input-file /w/in.jsonl", "--url http://127.0.0.1:8000",
                 "--api-key k", "--extra-inputs ignore_eos:true", "--use-server-token-count"):
        assert part in text


def test_local_hub_cache_lays_out_a_snapshot(tmp_path: Path) -> None:
    tok = tmp_path / "model"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "model.safetensors").write_text("weights")
    hub = ar.local_hub_cache(tok, tmp_path / "hf", "a/b")
    repo = hub / "models--a--b"
    rev = (repo / "refs" / "main").read_text()
    snap = repo / "snapshots" / rev
    assert (snap / "tokenizer.json").resolve() == (tok / "tokenizer.json").resolve()
    assert not (snap / "model.safetensors").exists()
    assert ar.local_hub_cache(tok, tmp_path / "hf", "a/b") == hub  # idempotent
    with pytest.raises(ValueError):
        ar.local_hub_cache(tmp_path / "hf", tmp_path / "hf2")


EXPORT = {"aiperf_version": "0.13.0",
          "time_to_first_token": {"unit": "ms", "avg": 120.0, "p50": 100.0, "p90": 300.0, "p99": 900.0},
          "request_throughput": {"unit": "requests/sec", "avg": 1.25},
          "output_token_throughput": {"unit": "tokens/sec", "avg": 14.0},
          "request_count": {"unit": "requests", "avg": 400.0},
          "overall_usage_prompt_cache_read_pct": {"unit": "%", "avg": 12.5},
          "error_summary": []}


def test_parse_export_reads_aiperfs_json() -> None:
    got = ar.parse_export(EXPORT)
    assert got["ttft_p50_ms"] == 100.0 and got["ttft_p90_ms"] == 300.0 and got["requests"] == 400
    assert got["errors"] == 0 and got["request_throughput_per_s"] == 1.25 and got["prompt_cache_read_pct"] == 12.5
    assert got["itl_p50_ms"] is None  # absent metrics are None, not errors
    assert ar.parse_export(EXPORT | {"error_request_count": {"unit": "requests", "avg": 3}})["errors"] == 3


def test_cache_hit_rate_from_raw_records() -> None:
    usage = '{\\"usage\\": {\\"prompt_tokens\\": 200, \\"prompt_tokens_details\\": {\\"cached_tokens\\": 128}}}'
    lines = [f'{{"responses": [{{"packets": [{{"value": "{usage}"}}]}}]}}', '{"responses": []}']
    assert ar.cache_hit_rate(lines) == {"cache_hit_rate": 0.64, "cached_tokens": 128, "prompt_tokens": 200,
                                        "requests_with_usage": 1}
    assert ar.cache_hit_rate([])["cache_hit_rate"] is None


def test_ratios_use_medians_and_pairs() -> None:
    def run(system: str, p50: float, **kw) -> dict:
        return {"system": system, "ttft_p50_ms": p50, "ttft_p90_ms": 2 * p50, "output_token_throughput_per_s": 10.0,
                "request_throughput_per_s": 1.0} | kw
    runs = [run("kv-aware", 100), run("round-robin", 200), run("kv-aware", 300), run("round-robin", 400),
            run("round-robin", 1, error="aiperf exited with 1")]
    got = ar.ratios(runs)
    assert (got["median_by_system"]["kv-aware"]["ttft_p50_ms"] == 200
            and got["median_by_system"]["kv-aware"]["runs"] == 2)
    assert got["ttft_p50_ratio_vs_round_robin"] == round(200 / 300, 3)
    assert got["ttft_p50_ratio_per_pair"] == [0.5, 0.75] and got["throughput_ratio_vs_round_robin"] == 1.0
    assert ar.ratios([run("kv-aware", 100)])["ttft_p50_ratio_vs_round_robin"] is None


def test_dry_run_writes_the_scaled_trace(tmp_path: Path, capsys) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in TRACE))
    assert ar.main(["--trace-file", str(trace), "--requests", "4", "--out", str(tmp_path / "o.json"), "--dry-run",
                    "--work-dir", str(tmp_path / "w"), "--tokenizer", str(tmp_path)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "w" / "mooncake_scaled.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and "--fixed-schedule" in capsys.readouterr().out
    assert not (tmp_path / "o.json").exists()


def test_table_lists_runs_then_medians() -> None:
    runs = [{"system": "kv-aware", "ttft_p50_ms": 100.4, "ttft_p90_ms": 300.0, "output_token_throughput_per_s": 9.87,
             "request_throughput_per_s": 0.9, "prompt_cache_read_pct": 7.25, "requests": 400, "errors": 0},
            {"system": "round-robin", "error": "aiperf exited with 1"}]
    text = ar.table({"runs": runs} | ar.ratios(runs))
    assert "| kv-aware (run 1) | 100 | 300 | 9.9 | 0.90 | 7.2% | 400 / 0 |" in text
    assert "round-robin (run 2) | failed: aiperf exited with 1" in text and "**kv-aware**, median of 1" in text
