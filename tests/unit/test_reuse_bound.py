"""Hit-rate bounds of a Mooncake replay: blocks named as the workload builds prompts, LRU bounds ordered."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench.workloads.mooncake import MooncakeWorkload
from benchmarks.routing_h2h.reuse_bound import engine_blocks, lru_hits, reuse_bounds

pytestmark = pytest.mark.unit


def _workload(tmp_path, lines: list[dict], **kw) -> MooncakeWorkload:
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return MooncakeWorkload(path=trace, **kw)


def test_lines_sharing_leading_hash_ids_share_exactly_those_blocks(tmp_path):
    lines = [{"timestamp": 0, "input_length": 512 * 3, "output_length": 1, "hash_ids": [1, 2, 3]},
             {"timestamp": 1, "input_length": 512 * 3 + 300, "output_length": 1, "hash_ids": [1, 2, 4]}]
    wl = _workload(tmp_path, lines, block_tokens=64)  # 1/8 of the input: 192 and 230 tokens
    a, b = (engine_blocks(wl, rec, i, 16) for i, rec in enumerate(wl.records()))
    assert len(a) == 192 // 16 and len(b) == 230 // 16
    assert a[:8] == b[:8]  # trace blocks 1 and 2: four 16-token blocks each
    assert not set(a[8:]) & set(b[8:])
    assert b[-1][0] == "own"  # tokens past the line's hash ids are its own


def test_bounds_are_ordered_and_round_robin_loses_what_affinity_keeps():
    sessions = [[("s", k, j) for j in range(10)] for k in range(4)]
    prompts = [sessions[i % 4] for i in range(40)]  # four prompts repeating, each 10 blocks
    unbounded, total = lru_hits(prompts, None)
    assert (unbounded, total) == (360, 400)
    b = reuse_bounds(prompts, replicas=4, cache_blocks=10)
    # pooled: 40 blocks hold all four; round-robin happens to send each prompt to the same replica here
    assert b["unbounded"] == b["pooled_lru"] == b["round_robin_lru"] == 0.9
    # three replicas: each sees all four prompts in turn and evicts each before it comes back; pooled, they fit
    b = reuse_bounds(prompts, replicas=3, cache_blocks=14)
    assert b["unbounded"] == b["pooled_lru"] == 0.9 and b["round_robin_lru"] == 0.0
    assert b["prefill_ratio_floor"] == 0.1
