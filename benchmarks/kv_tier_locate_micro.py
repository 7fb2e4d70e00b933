r"""The KV tier directory's ``locate`` round trip through Ray: reply shape per block vs per chunk.

Owns the measurement behind ``directory.ChunkLocation``. A tier load asks the directory actor where its
blocks are; every object ref inside an actor's reply goes through Ray's reference counting (the caller
becomes a borrower of each), so the reply's cost grows with the refs it names. This starts a local Ray,
has a store actor ``ray.put`` ``--chunks`` small chunk objects (their owner, as an engine owns the chunks it
stores), registers them in a directory actor (``max_concurrency=1``, as the tier's) and times, from the
driver, ``--calls`` calls of:

  * ``per_block``: one record per block (ref, index, chunk id, owner): what ``locate`` answered before
    (``--blocks`` refs, all naming the same ``--chunks`` objects);
  * ``per_chunk``: the real ``BlockDirectory.locate`` (one ``ChunkLocation`` per chunk: ``--chunks`` refs);
  * ``empty``: a call that returns None (the actor round trip alone).

Defaults: 8K tokens of 16-token blocks (512 blocks) in 32 chunks, as ``kv_tier_h200.py``'s prefix.
No GPU, no vLLM. Writes JSON (p50/p90/min ms per variant, command, machine, git commit):

    flock /tmp/kvserve-ray.lock python -m benchmarks.kv_tier_locate_micro \
        --out benchmarks/results/kv_tier_locate_micro.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench.result import git_commit, machine_info
from deployments.kv_tier.directory import BlockDirectory


@dataclass(frozen=True, slots=True)
class BlockRecord:
    """The per-block reply shape ``locate`` had before ``ChunkLocation``."""

    ref: Any
    index: int
    chunk_id: int
    owner: str


class Directory(BlockDirectory):
    """The tier's directory with the old per-block reply beside the real one."""

    def add_wrapped(self, owner: str, keys: list[bytes], refs: list, nbytes: int) -> bool:
        return self.add_chunk(owner, keys, refs[0], nbytes)

    def per_block(self, keys: list[bytes]) -> list[BlockRecord]:
        out = []
        for k in keys:
            cid, index = self._blocks[k]
            out.append(BlockRecord(self._chunks[cid].ref, index, cid, self._chunks[cid].owner))
        return out

    def empty(self) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=512)
    p.add_argument("--chunks", type=int, default=32)
    p.add_argument("--calls", type=int, default=100, help="timed calls per variant (after 5 warm-up calls)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.blocks % args.chunks:
        p.error("--blocks must be a multiple of --chunks")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import numpy as np
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        @ray.remote
        class Store:
            def put(self, n: int) -> list[list]:
                return [[ray.put(np.zeros(1024, np.uint8))] for _ in range(n)]

        per = args.blocks // args.chunks
        keys = [i.to_bytes(8, "big") for i in range(args.blocks)]
        store = Store.remote()
        directory = ray.remote(Directory).options(num_cpus=0, max_concurrency=1).remote(1 << 40)
        wrapped = ray.get(store.put.remote(args.chunks))
        for c, w in enumerate(wrapped):
            ray.get(directory.add_wrapped.remote("store", keys[c * per:(c + 1) * per], w, 1024))
        found = ray.get(directory.locate.remote(keys))
        assert sum(len(c.pos) for c in found) == args.blocks and len(found) == args.chunks
        calls = {"per_block": lambda: directory.per_block.remote(keys),
                 "per_chunk": lambda: directory.locate.remote(keys),
                 "empty": lambda: directory.empty.remote()}
        result: dict[str, Any] = {}
        for name, call in calls.items():
            ms = []
            for i in range(args.calls + 5):
                t = time.perf_counter()
                reply = ray.get(call())
                ms.append((time.perf_counter() - t) * 1e3)
                del reply
            ms = ms[5:]
            result[name] = {"p50_ms": round(statistics.median(ms), 3),
                            "p90_ms": round(statistics.quantiles(ms, n=10)[-1], 3), "min_ms": round(min(ms), 3),
                            "calls": args.calls}
            print(f"[locate] {name}: {result[name]}", flush=True)
    finally:
        ray.shutdown()
    doc = {"schema": "kvserve.kv_tier_locate_micro/1", "blocks": args.blocks, "chunks": args.chunks,
           "variants": result,
           "per_block_over_per_chunk": round(result["per_block"]["p50_ms"] / result["per_chunk"]["p50_ms"], 2),
           "command": shlex.join(["python", "-m", "benchmarks.kv_tier_locate_micro", *(argv or sys.argv[1:])]),
           "machine": machine_info(), "loadavg_1m": round(os.getloadavg()[0], 2), "git_commit": git_commit()}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
