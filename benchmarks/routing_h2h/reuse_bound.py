"""How much of a Mooncake replay any router could serve from cache: hit-rate bounds of the lines a cell replays.

Owns ``engine_blocks`` (a trace line's prompt as the engine's KV blocks, the way ``MooncakeWorkload`` builds it) and
``reuse_bounds``. Over the first ``requests`` lines, scaled as the head-to-head's ``mooncake`` cells scale them, it
counts the share of prompt blocks that an earlier line already computed:

* ``unbounded``: with one cache of unlimited size, the most any router and any cache size could hit;
* ``pooled_lru``: with one LRU cache as large as every replica's together, what a router that always finds a
  prompt's blocks, and never evicts what another prompt needs, would about hit;
* ``round_robin_lru``: with one LRU cache per replica, each fed every ``replicas``-th line.

A trace line's blocks are chained (equal hash ids at a position mean equal prefixes), so an engine block is named by
its trace block's id and its place in it; tokens past a line's hash ids are its own. While prefill is what an engine
spends its time on, a router changes that time by the uncached share at most, so ``(1 - unbounded) /
(1 - round_robin_lru)`` is about the lowest prefill-time ratio to round-robin that any router reaches on those lines.

    python -m benchmarks.routing_h2h.reuse_bound --out benchmarks/results/mooncake_reuse_bound.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.bench.result import git_commit, machine_info
from benchmarks.bench.workloads.mooncake import MooncakeWorkload
from serve_app import settings

Block = tuple


def engine_blocks(workload: MooncakeWorkload, record: dict, index: int, engine_block: int) -> list[Block]:
    """The full engine KV blocks of one trace line's prompt (``workload``'s scaling), named so that equal names
    are equal blocks."""
    n = workload.input_len(record)
    per_trace_block = workload.block_tokens // engine_block
    hash_ids = record["hash_ids"]
    out: list[Block] = []
    for j in range(n // engine_block):
        k = j // per_trace_block if per_trace_block else j * engine_block // workload.block_tokens
        out.append((hash_ids[k], j % max(per_trace_block, 1)) if k < len(hash_ids) else ("own", index, j))
    return out


def lru_hits(prompts: Iterable[Sequence[Block]], capacity: int | None) -> tuple[int, int]:
    """(hit blocks, blocks) of an LRU cache of ``capacity`` blocks (None: unbounded) fed ``prompts`` in order."""
    cache: OrderedDict[Block, None] = OrderedDict()
    hits = total = 0
    for blocks in prompts:
        for b in blocks:
            total += 1
            if b in cache:
                hits += 1
                cache.move_to_end(b)
                continue
            cache[b] = None
            if capacity is not None and len(cache) > capacity:
                cache.popitem(last=False)
    return hits, total


def reuse_bounds(prompts: list[list[Block]], replicas: int, cache_blocks: int) -> dict[str, float]:
    """Hit-rate bounds of ``prompts`` (in arrival order) on ``replicas`` caches of ``cache_blocks`` blocks each."""
    unbounded = lru_hits(prompts, None)
    pooled = lru_hits(prompts, cache_blocks * replicas)
    per = [lru_hits(prompts[r::replicas], cache_blocks) for r in range(replicas)]
    rr = (sum(h for h, _ in per), sum(t for _, t in per))
    share = {"unbounded": unbounded, "pooled_lru": pooled, "round_robin_lru": rr}
    out = {k: round(h / t, 4) if t else 0.0 for k, (h, t) in share.items()}
    out["prefill_ratio_floor"] = round((1 - out["unbounded"]) / (1 - out["round_robin_lru"]), 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace-file", type=settings.resolve_repo_path, default=settings.mooncake_trace())
    p.add_argument("--requests", type=lambda s: [int(x) for x in s.split(",")], default=[731, 1100, 2200],
                   help="replayed lines (from the first): the r70 and sat cells' counts, and a 60-s sat cell's")
    p.add_argument("--block-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[64, 512],
                   help="tokens per trace block (the cells use 64; 512 is the trace's own)")
    p.add_argument("--max-input-tokens", type=int, default=7000)
    p.add_argument("--engine-block", type=int, default=16, help="the engine's KV block size in tokens")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--cache-blocks", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384, 65536],
                   help="engine blocks per replica (configs/gpu-routing.yaml's cells override it to 4096)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not args.trace_file.is_file():
        p.error(f"mooncake trace not found: {args.trace_file}")
    rows = []
    for bt in args.block_tokens:
        if bt % args.engine_block:
            p.error(f"--block-tokens {bt} is not a multiple of --engine-block {args.engine_block}")
        wl = MooncakeWorkload(path=args.trace_file, block_tokens=bt, max_input_tokens=args.max_input_tokens,
                              limit=max(args.requests))
        prompts = [engine_blocks(wl, rec, i, args.engine_block) for i, rec in enumerate(wl.records())]
        for n in args.requests:
            for cache in args.cache_blocks:
                row = {"block_tokens": bt, "requests": n, "cache_blocks_per_replica": cache,
                       "mean_prompt_tokens": round(sum(map(len, prompts[:n])) * args.engine_block / max(n, 1))}
                row |= reuse_bounds(prompts[:n], args.replicas, cache)
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = {"command": " ".join(["python -m benchmarks.routing_h2h.reuse_bound", *sys.argv[1:]]),
           "git_commit": git_commit(), "machine": machine_info(), "trace": str(args.trace_file.name),
           "settings": {k: v for k, v in vars(args).items() if k not in ("out", "trace_file")}, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
