"""What Ray's ``PrefixCacheAffinityRouter`` spends on its prefix tree per request, on the GPU cells' prompts.

Owns ``prompts`` (the GPU head-to-head's docqa, multiturn and Mooncake prompts as the simulator twins them,
``routing_cells.sessions_for`` with the ``gpu`` scale's arguments, in arrival order: multiturn's sessions interleaved
as ``CONCURRENCY`` closed-loop clients interleave them), ``measure`` (Ray's own ``PrefixTree`` in this process: the
tree work alone) and ``measure_actor`` (Ray's ``PrefixTreeActor`` through ``ray.get``, as the router calls it on the
ingress's event loop: the tree work plus the round trip). Each request is decided as the router decides it: match
against four tenants, the matched ones when the match rate reaches 0.1, else the smallest tenants, then insert.
Token ids come from the twin's block keys (16 per block, ``ray_router.tokens_as_text`` makes them characters), so
the tree sees the cells' sharing to the block.

    python -m benchmarks.routing_h2h.ray_tree_cost --out benchmarks/results/ray_tree_cost_cpu.json

The actor part starts a local Ray (``--no-actor`` skips it).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from itertools import islice

import ray
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTree, PrefixTreeActor

from benchmarks.bench.result import git_commit, machine_info
from benchmarks.bench.stats import distribution
from benchmarks.routing_h2h.ray_router import tokens_as_text
from benchmarks.routing_h2h.systems import SCALES
from benchmarks.simulator.ray_twin import MATCH_RATE_THRESHOLD
from benchmarks.simulator.routing_cells import sessions_for

WORKLOADS = ("docqa", "multiturn", "mooncake")
TENANTS = ("r0", "r1", "r2", "r3")
BLOCK = 16
CONCURRENCY = 64


def prompt_text(block_hashes: tuple[int, ...], prompt_tokens: int) -> str:
    """One character per token: 16 ids per block key (its 4-bit windows), the partial tail numbered."""
    ids = [(h >> (4 * i)) & 0xFFFF for h in block_hashes for i in range(BLOCK)]
    ids += range(max(prompt_tokens - len(ids), 0))
    return tokens_as_text(ids)


def prompts(workload: str, n: int, trace_file: str | None = None, seed: int = 0) -> list[str]:
    """The first ``n`` prompts of the ``gpu`` scale's ``workload`` cell, in the order its clients send them."""
    args = list(SCALES["gpu"]["workloads"][workload])
    if workload == "mooncake" and trace_file:
        args += ["--trace-file", trace_file]
    sessions = sessions_for(workload, args, BLOCK, seed)
    turns = _interleaved(sessions, random.Random(seed)) if workload == "multiturn" else (
        t for s in sessions for t in s.turns)
    return [prompt_text(t.block_hashes, t.prompt_tokens) for t in islice(turns, n)]


def _interleaved(sessions: Iterator, rng: random.Random) -> Iterator:
    """Turns of ``CONCURRENCY`` sessions at a time, the next turn from a random one, a new session when one ends."""
    active = [iter(s.turns) for s in islice(sessions, CONCURRENCY)]
    while active:
        i = rng.randrange(len(active))
        turn = next(active[i], None)
        if turn is not None:
            yield turn
            continue
        fresh = next(sessions, None)
        if fresh is not None:
            active[i] = iter(fresh.turns)
        else:
            active.pop(i)


def _decide(matched: str, text: str, tenants: list[str], smallest: Callable[[], list[str]] | None,
            rng: random.Random) -> str:
    if tenants and len(matched) >= MATCH_RATE_THRESHOLD * len(text):
        return rng.choice(sorted(tenants))
    low = smallest() if smallest else None
    return rng.choice(sorted(low) if low else list(TENANTS))


def measure(texts: list[str], seed: int = 0) -> dict:
    """Ray's ``PrefixTree`` in this process: milliseconds per match, insert and smallest-tenant lookup
    (``bench.stats.distribution``; None where there was none)."""
    tree, rng = PrefixTree(), random.Random(seed)
    tree.add_tenants(list(TENANTS), time.time())
    match, insert, smallest = [], [], []

    def timed_smallest():
        t0 = time.perf_counter()
        low = tree.get_smallest_tenants()
        smallest.append(time.perf_counter() - t0)
        return low

    for text in texts:
        t0 = time.perf_counter()
        matched, tenants = tree.prefix_match(text, list(TENANTS))
        match.append(time.perf_counter() - t0)
        tenant = _decide(matched, text, tenants, timed_smallest, rng)
        t0 = time.perf_counter()
        tree.insert(text, tenant, time.time())
        insert.append(time.perf_counter() - t0)
    return {"prefix_match": distribution(match), "insert": distribution(insert),
            "get_smallest_tenants": distribution(smallest)}


def measure_actor(texts: list[str], seed: int = 0) -> dict:
    """Ray's ``PrefixTreeActor`` through ``ray.get`` (Ray must be initialised): milliseconds per blocking call."""
    actor, rng = PrefixTreeActor.remote(), random.Random(seed)
    ray.get(actor.add_tenants.remote(list(TENANTS), time.time()))
    match, insert = [], []
    try:
        for text in texts:
            t0 = time.perf_counter()
            matched, tenants = ray.get(actor.prefix_match.remote(text, list(TENANTS)))
            match.append(time.perf_counter() - t0)
            tenant = _decide(matched, text, tenants, lambda: ray.get(actor.get_smallest_tenants.remote()), rng)
            t0 = time.perf_counter()
            ray.get(actor.insert.remote(text, tenant, time.time()))
            insert.append(time.perf_counter() - t0)
    finally:
        ray.kill(actor)
    return {"prefix_match": distribution(match), "insert": distribution(insert)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--requests", type=int, default=1024, help="prompts per workload, in-process")
    p.add_argument("--actor-requests", type=int, default=600, help="prompts per workload through the actor")
    p.add_argument("--no-actor", action="store_true")
    p.add_argument("--trace-file", default=None, help="the Mooncake trace (default: KVSERVE_MOONCAKE_TRACE)")
    args = p.parse_args(argv)
    texts = {w: prompts(w, max(args.requests, args.actor_requests), args.trace_file) for w in WORKLOADS}
    results = {w: {"prompt_chars_mean": round(sum(map(len, t[:args.requests])) / len(t[:args.requests]), 1),
                   "in_process": measure(t[:args.requests])} for w, t in texts.items()}
    if not args.no_actor:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            for w, t in texts.items():
                results[w]["actor"] = measure_actor(t[:args.actor_requests])
        finally:
            ray.shutdown()
    doc = {"schema": "kvserve.ray_tree_cost/1", "command": shlex.join(
               ["python", "-m", "benchmarks.routing_h2h.ray_tree_cost", *(sys.argv[1:] if argv is None else argv)]),
           "git_commit": git_commit(), "machine": machine_info(),
           "versions": {"ray": ray.__version__}, "tenants": len(TENANTS), "concurrency": CONCURRENCY,
           "results": results}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    for w, r in results.items():
        line = f"{w}: {r['prompt_chars_mean']:.0f} chars; in process match/insert p50 " \
               f"{r['in_process']['prefix_match']['p50']:.3f}/{r['in_process']['insert']['p50']:.3f} ms"
        if "actor" in r:
            line += f"; ray.get match/insert p50 {r['actor']['prefix_match']['p50']:.2f}/" \
                    f"{r['actor']['insert']['p50']:.2f} ms"
        print(line)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
