"""KV-event ingestion micro-benchmark: what a replica's event stream costs the router's event loop.

Measures, in-process and without Ray or sockets, the path ``KVEventSubscriber._apply`` takes per batch
(msgpack decode, ``decode_batch``, ``coalesce``, ``Policy.on_event`` of a kv-aware policy) for the
events vLLM's block pool emits while prompts with nothing in common stream through 4 replicas:
per prompt of ``--blocks`` blocks, ``BlockStored`` batches of 125 chained blocks, and as many
evictions, each its own single-hash ``BlockRemoved`` (25 per batch). Reported per block hash, the
minimum over ``--repeats`` interleaved rounds (the machine is shared), one by one and coalesced.
From these, ``loop_ms_per_s_at`` gives the router-loop time per second at a request rate.

Usage: ``python -m benchmarks.kv_events_microbench [--prompts N] [--blocks B] [--rate R] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench.result import git_commit, machine_info
from routers.events import coalesce, decode_batch
from routers.policy import make_policy
from serve_app.config.routing import RoutingConfig

REPLICAS = 4
STORED_PER_BATCH = 125
REMOVED_PER_BATCH = 25


def batches(prompts: int, blocks: int, seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    """Encoded store batches and removal batches (array form, as vLLM sends them)."""
    rng = random.Random(seed)
    enc = msgspec.msgpack.Encoder()
    stored, removed = [], []
    for _ in range(prompts):
        hashes = [rng.getrandbits(64) for _ in range(blocks)]
        for i in range(0, blocks, STORED_PER_BATCH):
            parent = hashes[i - 1] if i else None
            stored.append(enc.encode([0.0, [["BlockStored", hashes[i:i + STORED_PER_BATCH], parent, [], 16, None,
                                             None]], None]))
        for j in range(0, blocks, REMOVED_PER_BATCH):
            removed.append(enc.encode([0.0, [["BlockRemoved", [h], None] for h in hashes[j:j + REMOVED_PER_BATCH]],
                                       None]))
    return stored, removed


def apply_all(payloads: list[bytes], merge: bool) -> float:
    """Seconds to apply ``payloads`` to a fresh kv-aware policy, replicas in turn."""
    policy = make_policy(RoutingConfig(strategy="kv-aware").knobs())
    dec = msgspec.msgpack.Decoder()
    t0 = time.perf_counter()
    for k, payload in enumerate(payloads):
        _ts, events, _rank = decode_batch(dec.decode(payload))
        for ev in coalesce(events) if merge else events:
            policy.on_event(f"r{k % REPLICAS}", ev)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--blocks", type=int, default=375, help="blocks per prompt (6K tokens of 16-token blocks)")
    ap.add_argument("--rate", type=float, default=17.0, help="requests/s for loop_ms_per_s_at")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kv_events_microbench.json"))
    args = ap.parse_args(argv)
    stored, removed = batches(args.prompts, args.blocks)
    n = args.prompts * args.blocks
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for merge in (False, True):
            for kind, payloads in (("stored", stored), ("removed", removed)):
                key = f"{kind}_{'coalesced' if merge else 'one_by_one'}_us_per_hash"
                best[key] = min(best.get(key, float("inf")), apply_all(payloads, merge) / n * 1e6)
    results = {k: round(v, 3) for k, v in sorted(best.items())}
    for mode in ("one_by_one", "coalesced"):
        per_prompt_us = args.blocks * (best[f"stored_{mode}_us_per_hash"] + best[f"removed_{mode}_us_per_hash"])
        results[f"loop_ms_per_s_at_{args.rate:g}_req_per_s_{mode}"] = round(per_prompt_us * args.rate / 1e3, 2)
    commit = git_commit() or ""
    doc = {"command": "python -m benchmarks.kv_events_microbench " + " ".join(argv if argv is not None
                                                                               else sys.argv[1:]),
           "git_commit": commit, "machine": machine_info(), "load_average_1_5_15": [round(x, 2) for x in
                                                                                      os.getloadavg()],
           "setup": {"replicas": REPLICAS, "prompts": args.prompts, "blocks_per_prompt": args.blocks,
                     "stored_per_batch": STORED_PER_BATCH, "removed_per_batch": REMOVED_PER_BATCH,
                     "repeats": args.repeats, "statistic": "min over repeats"},
           "results": results}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
