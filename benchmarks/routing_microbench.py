"""Routing decision micro-benchmark: 16 replicas, 100k indexed blocks (issue 3 target: p50 <= 50 us).

Measures, in-process and without Ray:
  * ``choose``: ``Policy.choose`` for prefix-aware (approximate index) and kv-aware (precise index
    fed with BlockStored events), on 2K-token prompts that share one of 64 documents (1K tokens)
    and carry a unique 1K-token question; the index holds 100k block entries over 16 replicas;
  * ``choose_cold``: the same with prompts nobody holds (the walk stops at block 0);
  * ``snapshots_and_choose``: what the Serve adapter does per decision without Ray: 16
    ``LoadTracker.snapshot`` calls from report dicts, then ``choose``, at 1000 decisions/s with the
    router's own accounting updated after each (so changed replicas' snapshots are rebuilt);
  * ``on_routed``: the index update after a decision;
  * ``hash_2k_tokens_*``: computing a 2K-token prompt's block hashes (sha256, block size 16), which
    the ingress or the adapter does once per request; plain, and with ``BlockHasher``'s memo when
    the 1K-token document part was seen before;
  * ``hash_6k_tokens_unique_memo_full``: ``BlockHasher`` on prompts nobody sent before (the no-sharing
    workload: ~6K tokens, every block new) once its memo is full, so every block evicts one entry (400 prompts,
    150K evictions: a plain dict's cost of deleting its oldest key grows with the deletions since its last resize).

Usage: ``python -m benchmarks.routing_microbench [--decisions N] [--out PATH]``; writes
benchmarks/results/routing_microbench.json with the command line and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from benchmarks.bench.result import git_commit
from routers.events import BlockStored
from routers.hashing import BlockHasher, block_hashes
from routers.load import LoadTracker
from routers.policy import make_policy
from routers.types import ReplicaSnapshot, RoutingRequest
from serve_app.config.routing import RoutingConfig

REPLICAS, BLOCK, DOCS, DOC_TOKENS, QUESTION_TOKENS, INDEXED = 16, 16, 64, 1024, 1024, 100_000


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 100_000) for _ in range(n)]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _summary(samples_s: list[float]) -> dict[str, float]:
    us = [x * 1e6 for x in samples_s]
    return {"p50_us": round(_pct(us, 0.5), 2), "p90_us": round(_pct(us, 0.9), 2), "p99_us": round(_pct(us, 0.99), 2),
            "mean_us": round(statistics.fmean(us), 2), "n": len(us)}


def bench(strategy: str, decisions: int, seed: int = 0) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    policy = make_policy(RoutingConfig(strategy=strategy).knobs())  # the documented defaults
    snaps = [ReplicaSnapshot(f"replica-{i:02d}", queued_prefill_tokens=rng.randrange(0, 4000),
                             running=rng.randrange(0, 8),
                             kv_capacity_blocks=INDEXED // REPLICAS, block_size=BLOCK) for i in range(REPLICAS)]
    docs = [_tokens(rng, DOC_TOKENS) for _ in range(DOCS)]

    def make_request(doc: int | None) -> RoutingRequest:
        toks = (docs[doc] if doc is not None else _tokens(rng, DOC_TOKENS)) + _tokens(rng, QUESTION_TOKENS)
        return RoutingRequest("m", len(toks), tuple(block_hashes(toks, BLOCK)))

    # Fill the index to 100k block entries, as routing (approx) or engine events (precise) would.
    t = 0.0
    while (policy.approx.size() + (policy.precise.size() if policy.precise else 0)) < INDEXED:
        req = make_request(rng.randrange(DOCS))
        snap = snaps[rng.randrange(REPLICAS)]
        if policy.precise is not None:
            policy.on_event(snap.replica_id, BlockStored(req.block_hashes, "GPU"))
        else:
            policy.on_routed(req, snap, t)
        t += 0.01
    if policy.precise is not None:
        for s in snaps:
            policy.precise.mark_live(s.replica_id)
    hot = [make_request(rng.randrange(DOCS)) for _ in range(512)]
    cold = [make_request(None) for _ in range(512)]

    out: dict[str, dict[str, float]] = {}
    for name, reqs in (("choose", hot), ("choose_cold", cold)):
        samples = []
        for i in range(decisions):
            req = reqs[i % len(reqs)]
            t0 = time.perf_counter()
            policy.choose(req, snaps, 1e6, rng)
            samples.append(time.perf_counter() - t0)
        out[name] = _summary(samples)
    load, routed = LoadTracker(default_prefill_s_per_token=1e-4), []
    reports = {s.replica_id: {"block_size": BLOCK, "num_gpu_blocks": s.kv_capacity_blocks, "num_running": s.running,
                              "num_waiting": 0, "queued_prefill_tokens": s.queued_prefill_tokens, "kv_usage": 0.1,
                              "prefill_tokens_per_s": 20_000.0, "timestamp": 1e6 - 0.5} for s in snaps}
    samples = []
    now = 1e6
    for i in range(decisions):  # 1000 decisions/s; each routed request completes 16 decisions later
        req = hot[i % len(hot)]
        now += 0.001
        t0 = time.perf_counter()
        fresh = [load.snapshot(rid, rep, 256, now) for rid, rep in reports.items()]
        d = policy.choose(req, fresh, now, rng)
        samples.append(time.perf_counter() - t0)
        load.on_routed(d.replica_id, str(i), req.num_prompt_tokens - d.predicted_cached_tokens, now)
        if i >= REPLICAS:
            load.on_completed(routed[i - REPLICAS], str(i - REPLICAS))
        routed.append(d.replica_id)
    out["snapshots_and_choose"] = _summary(samples)
    samples = []
    for i in range(min(decisions, 2000)):
        req = hot[i % len(hot)]
        t0 = time.perf_counter()
        policy.on_routed(req, snaps[i % REPLICAS], 1e6 + i)
        samples.append(time.perf_counter() - t0)
    out["on_routed"] = _summary(samples)
    out["index_entries"] = {"approx": policy.approx.size(), "precise": policy.precise.size() if policy.precise else 0}
    return out


def bench_hash(n: int = 300, memo: bool = False) -> dict[str, float]:
    """2K-token prompts; with ``memo``, the 1K-token document part was hashed before (a new question)."""
    rng = random.Random(1)
    doc = _tokens(rng, DOC_TOKENS)
    hasher = BlockHasher()
    hasher(doc, BLOCK)
    samples = []
    for _ in range(n):
        toks = doc + _tokens(rng, QUESTION_TOKENS)
        t0 = time.perf_counter()
        hasher(toks, BLOCK) if memo else block_hashes(toks, BLOCK)
        samples.append(time.perf_counter() - t0)
    return _summary(samples)


def bench_hash_full_memo(n: int = 400, tokens: int = 6144) -> dict[str, float]:
    """Unique ``tokens``-token prompts through a ``BlockHasher`` whose memo is already at its bound."""
    rng = random.Random(2)
    hasher = BlockHasher()
    while len(hasher) < hasher.max_entries:
        hasher(_tokens(rng, tokens), BLOCK)
    samples = []
    for _ in range(n):
        toks = _tokens(rng, tokens)
        t0 = time.perf_counter()
        hasher(toks, BLOCK)
        samples.append(time.perf_counter() - t0)
    return _summary(samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decisions", type=int, default=20_000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "routing_microbench.json"))
    args = ap.parse_args(argv)
    results = {s: bench(s, args.decisions) for s in ("prefix-aware", "kv-aware")}
    results["hash_2k_tokens_sha256"] = bench_hash()
    results["hash_2k_tokens_sha256_memo_shared_1k_prefix"] = bench_hash(memo=True)
    results["hash_6k_tokens_unique_memo_full"] = bench_hash_full_memo()
    doc = {
        "command": "python -m benchmarks.routing_microbench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "setup": {"replicas": REPLICAS, "indexed_blocks": INDEXED, "block_size": BLOCK,
                  "prompt_tokens": DOC_TOKENS + QUESTION_TOKENS, "shared_docs": DOCS},
        "target": "choose p50 <= 50 us",
        "results": results,
        "git_commit": git_commit(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "note": "shared 2-core machine with other jobs running; p99 is sensitive to that",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
