"""Discrete-event simulation of a cluster of vLLM-like replicas behind a routers/ policy.

Owns: ``EngineModel`` (per-replica costs), ``simulate`` (one run) and ``Result``.

Replica model (deliberately small; the point is routing, not kernels)::

    prefill:  one request at a time, FIFO (chunked prefill serialises prefill work); duration =
              uncached tokens / (prefill_tokens_per_s / (1 + decode_interference * running)) + step_s
    cache:    an LRU of block hashes with kv_blocks capacity; a request reuses the longest prefix
              present when its prefill *starts*; its prompt blocks are inserted when it ends
              (KV events BlockStored / BlockRemoved are emitted to the policy then)
    decode:   output tokens * decode_s_per_token after the first token, concurrently with prefill

The router side is the production code: ``routers.policy`` decides, ``routers.load.LoadTracker``
merges replica reports (refreshed every ``stats_period_s``, so they are stale like Serve's) with
the router's own in-flight accounting, exactly as ``deployments/request_router.py`` does.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from benchmarks.simulator.workloads import SimRequest
from routers.events import BlockRemoved, BlockStored
from routers.load import LoadTracker
from routers.policy import Knobs, make_policy
from routers.types import RoutingRequest


@dataclass(frozen=True, slots=True)
class EngineModel:
    prefill_tokens_per_s: float = 10_000.0
    decode_s_per_token: float = 0.02
    decode_interference: float = 0.02
    step_s: float = 0.005
    kv_blocks: int = 4096
    block_size: int = 16
    max_ongoing: int = 256
    stats_period_s: float = 1.0


@dataclass
class _Replica:
    rid: str
    lru: OrderedDict = field(default_factory=OrderedDict)
    queue: deque = field(default_factory=deque)
    busy: bool = False
    current_end: float = 0.0
    current_uncached: int = 0
    running: int = 0
    served: int = 0


@dataclass
class Result:
    strategy: str
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    predicted_cached_tokens: int = 0
    output_tokens: int = 0
    makespan_s: float = 0.0
    reasons: Counter = field(default_factory=Counter)
    per_replica: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        def pct(q: float) -> float:
            xs = sorted(self.ttft_s)
            return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4) if xs else 0.0

        return {
            "requests": len(self.ttft_s),
            "ttft_p50_s": pct(0.5), "ttft_p90_s": pct(0.9), "ttft_p99_s": pct(0.99),
            "ttft_mean_s": round(sum(self.ttft_s) / max(len(self.ttft_s), 1), 4),
            "e2e_mean_s": round(sum(self.e2e_s) / max(len(self.e2e_s), 1), 4),
            "output_tok_per_s": round(self.output_tokens / self.makespan_s, 1) if self.makespan_s else 0.0,
            "cache_hit_rate": round(self.cached_tokens / max(self.prompt_tokens, 1), 4),
            "predicted_hit_rate": round(self.predicted_cached_tokens / max(self.prompt_tokens, 1), 4),
            "reasons": dict(self.reasons),
            "requests_per_replica": self.per_replica,
        }


def simulate(requests: list[SimRequest], knobs: Knobs, *, replicas: int, engine: EngineModel, seed: int = 0) -> Result:
    """Run ``requests`` through ``replicas`` simulated engines routed by ``knobs.strategy``."""
    policy = make_policy(knobs)
    load = LoadTracker(default_prefill_s_per_token=knobs.prefill_s_per_token)
    rng = random.Random(seed)
    reps = {f"r{i:03d}": _Replica(f"r{i:03d}") for i in range(replicas)}
    precise = getattr(policy, "precise", None)
    if precise is not None:
        for rid in reps:
            precise.mark_live(rid)
    res = Result(knobs.strategy)
    bs = engine.block_size
    stats: dict[str, dict] = {rid: {} for rid in reps}
    heap: list[tuple[float, int, str, object]] = []
    seq = 0

    def push(t: float, kind: str, payload: object) -> None:
        nonlocal seq
        heapq.heappush(heap, (t, seq, kind, payload))
        seq += 1

    def cached_blocks(rep: _Replica, hashes: tuple[int, ...]) -> int:
        n = 0
        for h in hashes:
            if h not in rep.lru:
                break
            n += 1
        return n

    def report(rep: _Replica, now: float) -> dict:
        """What a replica's record_routing_stats returns (the rate is measured, decode slowdown included)."""
        queued = rep.current_uncached if rep.busy else 0
        queued += sum(r.prompt_tokens - cached_blocks(rep, r.block_hashes) * bs for r in rep.queue)
        return {"block_size": bs, "num_gpu_blocks": engine.kv_blocks, "num_running": rep.running,
                "num_waiting": len(rep.queue) + int(rep.busy), "queued_prefill_tokens": int(queued),
                "prefill_tokens_per_s": engine.prefill_tokens_per_s / (1 + engine.decode_interference * rep.running),
                "timestamp": now, "kv_usage": 0.0}

    def start_prefill(rep: _Replica, now: float) -> None:
        if rep.busy or not rep.queue:
            return
        req = rep.queue.popleft()
        hit = min(cached_blocks(rep, req.block_hashes) * bs, max(req.prompt_tokens - 1, 0))
        for h in req.block_hashes[: hit // bs]:
            rep.lru.move_to_end(h)
        uncached = req.prompt_tokens - hit
        rate = engine.prefill_tokens_per_s / (1 + engine.decode_interference * rep.running)
        rep.busy, rep.current_uncached = True, uncached
        rep.current_end = now + uncached / rate + engine.step_s
        res.prompt_tokens += req.prompt_tokens
        res.cached_tokens += hit
        push(rep.current_end, "prefilled", (rep.rid, req))

    def insert_blocks(rep: _Replica, hashes: tuple[int, ...]) -> None:
        stored, removed = [], []
        for h in reversed(hashes):
            if h in rep.lru:
                rep.lru.move_to_end(h)
            else:
                rep.lru[h] = None
                stored.append(h)
        while len(rep.lru) > engine.kv_blocks:
            removed.append(rep.lru.popitem(last=False)[0])
        if precise is not None:
            if stored:
                policy.on_event(rep.rid, BlockStored(tuple(reversed(stored)), "GPU"))
            if removed:
                policy.on_event(rep.rid, BlockRemoved(tuple(removed), "GPU"))

    for req in requests:
        push(req.arrival, "arrive", req)
    for rid in reps:
        push(0.0, "stats", rid)
    remaining = len(requests)
    now = 0.0
    while heap and remaining:
        now, _, kind, payload = heapq.heappop(heap)
        if kind == "stats":
            stats[payload] = report(reps[payload], now)
            push(now + engine.stats_period_s, "stats", payload)
        elif kind == "arrive":
            req = payload
            snaps = [load.snapshot(rid, stats[rid], engine.max_ongoing, now) for rid in reps]
            rr = RoutingRequest("sim", req.prompt_tokens, req.block_hashes, req.session)
            d = policy.choose(rr, snaps, now, rng)
            res.reasons[d.reason] += 1
            res.predicted_cached_tokens += d.predicted_cached_tokens
            snap = next(s for s in snaps if s.replica_id == d.replica_id)
            policy.on_routed(rr, snap, now)
            load.on_routed(d.replica_id, str(req.rid), req.prompt_tokens - d.predicted_cached_tokens, now)
            rep = reps[d.replica_id]
            rep.served += 1
            rep.queue.append(req)
            start_prefill(rep, now)
        elif kind == "prefilled":
            rid, req = payload
            rep = reps[rid]
            rep.busy = False
            res.ttft_s.append(now - req.arrival)
            insert_blocks(rep, req.block_hashes)
            rep.running += 1
            push(now + req.output_tokens * engine.decode_s_per_token, "done", (rid, req))
            start_prefill(rep, now)
        elif kind == "done":
            rid, req = payload
            reps[rid].running -= 1
            load.on_completed(rid, str(req.rid))
            res.e2e_s.append(now - req.arrival)
            res.output_tokens += req.output_tokens
            remaining -= 1
    res.makespan_s = now - (requests[0].arrival if requests else 0.0)
    res.per_replica = {rid: r.served for rid, r in reps.items()}
    return res
