"""Ray Serve request router for the vLLM replica deployment: a thin adapter over routers/.

Owns: ``KVServeRouter`` (Serve ``RequestRouter`` subclass, created by Serve inside every process
holding a handle to the replica deployment, i.e. the ingress) and ``request_router_config`` (the
deployment option that selects it).

Per request (``choose_replicas``, on the handle's event loop, no blocking calls):
  1. read ``pending_request.args[0]`` (a ``GenerateRequest``); use its ``block_hashes`` or compute
     them with the engine's block size from the replicas' stats (vLLM-identical, routers.hashing,
     memoised so shared prefixes are not re-hashed);
  2. build one ``ReplicaSnapshot`` per candidate from ``RunningReplica.routing_stats``
     (``asdict(ReplicaStats)``, empty until the replica's first report) merged with this router's
     in-flight accounting (routers.load); 3. ``policy.choose`` -> Decision with a reason;
  4. return ``[[chosen], others]``: Serve sends to ``chosen`` unless its queue is full, else to the
     shortest queue among the others.
The decision is counted at once (load tracker, policy's tie-break and speculative index): Serve's routing task
calls ``choose_replicas`` for every pending request of a burst without yielding to the event loop, so the
requests' ``on_request_routed`` callbacks come only after the whole burst was decided, and decisions that
waited for them all saw the same state (on the H200 the 64 first turns of multiturn went 32/0/0/32 over four
replicas from two ingresses). When Serve reports where the request went (``on_request_routed``) a request sent
elsewhere (the chosen replica's queue was full) moves its count there; a retry of the same request takes back its
earlier count, and one never routed is taken back after ``_UNROUTED_TTL_S`` (or at ``on_request_completed``).
The router keeps its prediction of the cached prompt tokens until the replica's stats report what the engine
really found (``ReplicaStats.recent_cached_tokens``), for the prediction-error metric; ``on_request_completed``
releases the load. Replica removal or death drops its state.
With KV events (``RoutingConfig.publishes_kv_events``: kv-aware, or asked for): a ``KVEventSubscriber`` task per
replica endpoint feeds the policy on this loop (the precise index of kv-aware; other policies ignore them).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from deployments.kv_events import KVEventSubscriber
from deployments.metrics import metrics
from routers.hashing import BlockHasher
from routers.load import LoadTracker
from routers.policy import make_policy
from routers.types import Decision, ReplicaSnapshot, RoutingRequest
from serve_app.config.routing import RoutingConfig

logger = logging.getLogger(__name__)

ROUTER_CLASS = "deployments.request_router:KVServeRouter"
_SYNC_PERIOD_S = 1.0
_MAX_PENDING = 50_000
_UNROUTED_TTL_S = 30.0  # a decision Serve never acted on (the request was cancelled) stops counting


def request_router_config(
    routing: RoutingConfig, *, model_id: str = "", stats_period_s: float = 1.0, stats_timeout_s: float = 5.0
) -> dict[str, Any]:
    """Serve ``request_router_config`` for a vLLM replica deployment's options (kvserve's router unless
    ``routing.request_router_class`` names another).

    ``stats_period_s``/``stats_timeout_s``: how often Serve polls ``record_routing_stats`` (pass the
    deployment's ``request_routing_stats_period_s``/``_timeout_s``).
    """
    if routing.request_router_class is not None:  # somebody else's router (head-to-head benchmarks)
        cls, kwargs = routing.request_router_class, dict(routing.request_router_kwargs)
    else:
        cls, kwargs = ROUTER_CLASS, {"routing": routing.model_dump(mode="json"), "model_id": model_id}
    return {
        "request_router_class": cls,
        "request_router_kwargs": kwargs,
        "request_routing_stats_period_s": stats_period_s,
        "request_routing_stats_timeout_s": stats_timeout_s,
    }


class KVServeRouter(RequestRouter):
    """Cache- and load-aware routing for vLLM replicas (see routers/policy.py)."""

    def initialize_state(self, routing: dict[str, Any] | None = None, model_id: str = "", seed: int | None = None):
        self._config = RoutingConfig.model_validate(routing or {})
        knobs = self._config.knobs()
        self._policy = make_policy(knobs)
        self._strategy = knobs.strategy
        self._model = model_id
        self._load = LoadTracker(default_prefill_s_per_token=knobs.prefill_s_per_token,
                                 measured_speed=knobs.measured_prefill_speed)
        self._rng = random.Random(seed)
        self._hasher = BlockHasher(algo=self._config.hash_algo, seed=self._config.seed())
        # internal request id -> (request, decision, request id, decided at), oldest decision first
        self._pending: OrderedDict[str, tuple[RoutingRequest, Decision, str, float]] = OrderedDict()
        self._predicted: OrderedDict[str, int] = OrderedDict()  # request id -> predicted cached tokens
        self._settled: dict[str, Any] = {}  # replica -> the last stats report compared with predictions
        self._known: set[str] = set()
        self._subscriber: KVEventSubscriber | None = None
        self._last_sync = float("-inf")
        self._view_task: asyncio.Task | None = None
        logger.info("KVServeRouter for %r: %s", model_id, self._config.model_dump())

    # --- Serve hooks -----------------------------------------------------------------------
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas or pending_request is None:
            return [candidate_replicas]
        t0 = time.perf_counter()
        now = self._get_curr_time_s()
        try:
            snaps = [self._snapshot(r, now) for r in candidate_replicas]
            request, request_id = self._routing_request(pending_request, snaps)
            if request is None:
                return [candidate_replicas]  # not a GenerateRequest: Serve's shortest queue
            decision = self._policy.choose(request, snaps, now, self._rng)
            self._reserve(pending_request.metadata.internal_request_id, request, decision, request_id, snaps, now)
        except Exception:  # a routing bug must not strand the request: let Serve pick
            logger.exception("KVServeRouter.choose_replicas failed; falling back to Serve's choice")
            tags = {"model": self._model, "strategy": self._strategy, "reason": "router-error"}
            metrics().router_decisions.inc(1, tags=tags)
            return [candidate_replicas]
        self._maybe_sync(candidate_replicas, now)
        m = metrics()
        m.route_wait_ms.observe(max(time.time() - pending_request.created_at, 0.0) * 1000, tags={"model": self._model})
        m.router_decisions.inc(1, tags={"model": self._model, "strategy": self._strategy, "reason": decision.reason})
        m.router_decision_latency_us.observe((time.perf_counter() - t0) * 1e6, tags={"strategy": self._strategy})
        chosen = [r for r in candidate_replicas if r.replica_id.unique_id == decision.replica_id]
        return [chosen, [r for r in candidate_replicas if r.replica_id.unique_id != decision.replica_id]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult):
        try:
            key = pending_request.metadata.internal_request_id
            entry = self._pending.pop(key, None)
            if entry is None:
                return
            request, decision, request_id, _ = entry
            rid, now = replica_id.unique_id, self._get_curr_time_s()
            predicted = decision.predicted_cached_tokens
            if rid != decision.replica_id:  # Serve sent it elsewhere (the chosen replica's queue was full)
                predicted = 0
                self._load.cancel(decision.replica_id, key, now)
                replica = self._replicas.get(replica_id)
                stats = replica.routing_stats if replica is not None else None
                self._policy.on_routed(request, self._load.snapshot(rid, stats, 1 << 30, now), now)
                self._load.on_routed(rid, key, request.num_prompt_tokens, now)
            self._predicted[request_id] = predicted
            while len(self._predicted) > _MAX_PENDING:
                self._predicted.popitem(last=False)
            if predicted > 0:
                tags = {"model": self._model, "strategy": self._strategy}
                metrics().router_predicted_cached_tokens.inc(predicted, tags=tags)
        except Exception:  # never fail a request because of bookkeeping
            logger.exception("KVServeRouter.on_request_routed failed")

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str):
        entry = self._pending.pop(internal_request_id, None)
        if entry is not None:  # decided, never routed
            self._load.cancel(entry[1].replica_id, internal_request_id, self._get_curr_time_s())
        self._load.on_completed(replica_id.unique_id, internal_request_id)

    def update_replicas(self, replicas: list[RunningReplica]):
        super().update_replicas(replicas)
        current = {r.replica_id.unique_id for r in replicas}
        for rid in self._known - current:
            self._forget(rid)
        self._known = current
        self._last_sync = float("-inf")
        self._sync_subscriptions()

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id.unique_id)
        self._known.discard(replica_id.unique_id)
        self._last_sync = float("-inf")
        self._sync_subscriptions()

    # --- internals -------------------------------------------------------------------------
    def _reserve(self, key: str, request: RoutingRequest, decision: Decision, request_id: str,
                 snaps: Sequence[ReplicaSnapshot], now: float) -> None:
        """Count the decision on its replica now, before Serve reports the request routed (module docstring)."""
        earlier = self._pending.pop(key, None)
        if earlier is not None:  # Serve asks again for the same request: its earlier choice stops counting
            self._load.cancel(earlier[1].replica_id, key, now)
        rid = decision.replica_id
        snap = next(s for s in snaps if s.replica_id == rid)
        self._policy.on_routed(request, snap, now)
        self._load.on_routed(rid, key, max(request.num_prompt_tokens - decision.predicted_cached_tokens, 0), now)
        self._pending[key] = (request, decision, request_id, now)
        while len(self._pending) > _MAX_PENDING:
            self._take_back_oldest(now)

    def _expire_unrouted(self, now: float) -> None:
        """Take back decisions Serve never acted on within ``_UNROUTED_TTL_S`` (oldest first, up to a younger one)."""
        while self._pending and now - next(iter(self._pending.values()))[3] >= _UNROUTED_TTL_S:
            self._take_back_oldest(now)

    def _take_back_oldest(self, now: float) -> None:
        """The oldest decision still waiting for ``on_request_routed`` stops counting on its replica."""
        key, entry = self._pending.popitem(last=False)
        self._load.cancel(entry[1].replica_id, key, now)

    def _snapshot(self, replica: RunningReplica, now: float) -> ReplicaSnapshot:
        stats = replica.routing_stats or None
        if stats is not None and self._settled.get(replica.replica_id.unique_id) is not stats:
            self._settled[replica.replica_id.unique_id] = stats
            self._settle(stats)
        return self._load.snapshot(replica.replica_id.unique_id, stats, replica.max_ongoing_requests, now)

    def _settle(self, stats: Mapping[str, Any]) -> None:
        """Compare this router's predictions with the cached tokens a replica's engine reported."""
        tags = None
        for request_id, actual in stats.get("recent_cached_tokens") or ():
            predicted = self._predicted.pop(request_id, None)
            if predicted is None:
                continue  # another router's request, or compared already
            tags = tags or {"model": self._model, "strategy": self._strategy}
            m = metrics()
            if actual > 0:
                m.router_actual_cached_tokens.inc(actual, tags=tags)
            m.router_prediction_error_tokens.observe(abs(predicted - actual), tags=tags)

    def _routing_request(
        self, pending: PendingRequest, snaps: list[ReplicaSnapshot]
    ) -> tuple[RoutingRequest | None, str]:
        gen = pending.args[0] if pending.args else None
        token_ids = getattr(gen, "prompt_token_ids", None)
        if token_ids is None:
            return None, ""
        hashes = tuple(getattr(gen, "block_hashes", ()) or ())
        key = pending.metadata.internal_request_id
        if key in self._pending:
            hashes = hashes or self._pending[key][0].block_hashes  # a retry: hashed already
        if not hashes and self._strategy in ("prefix-aware", "kv-aware"):
            block_size = next((s.block_size for s in snaps if s.has_stats), 0)
            if block_size:
                hashes = tuple(self._hasher(token_ids, block_size, salt=getattr(gen, "cache_salt", None)))
        request = RoutingRequest(
            model_id=getattr(gen, "model_id", self._model),
            num_prompt_tokens=len(token_ids),
            block_hashes=hashes,
            session_key=getattr(gen, "session_key", None),
        )
        return request, str(getattr(gen, "request_id", key))

    def _forget(self, rid: str) -> None:
        self._settled.pop(rid, None)
        try:
            self._policy.remove_replica(rid)
            self._load.remove_replica(rid)
            metrics().router_index_blocks.set(0, tags={"model": self._model, "replica": rid,
                                                       "strategy": self._strategy})
        except Exception:
            logger.exception("KVServeRouter: dropping replica %s failed", rid)

    def _maybe_sync(self, replicas: list[RunningReplica], now: float) -> None:
        """At most once a second: KV-event subscriptions, index-size gauges and ``_export_view`` (which also runs
        every second without decisions: Ray drops a gauge not set again within two export intervals)."""
        if now - self._last_sync < _SYNC_PERIOD_S:
            return
        self._last_sync = now
        self._expire_unrouted(now)
        precise = getattr(self._policy, "precise", None)
        if precise is not None or self._config.publishes_kv_events():  # events without a precise index: costed only
            if self._subscriber is None:
                self._subscriber = KVEventSubscriber(
                    self._on_kv_event, self._on_kv_reset, replay=self._config.kv_events_replay, on_batch=self._on_batch
                )
            self._sync_subscriptions()
        approx = getattr(self._policy, "approx", None)
        if approx is not None:
            g = metrics().router_index_blocks
            for r in replicas:
                rid = r.replica_id.unique_id
                size = approx.size(rid) + (precise.size(rid) if precise is not None else 0)
                g.set(size, tags={"model": self._model, "replica": rid, "strategy": self._strategy})
        self._export_view(replicas, now)
        if self._view_task is None:
            self._view_task = asyncio.get_running_loop().create_task(self._export_view_forever())

    def _export_view(self, replicas: Sequence[RunningReplica], now: float) -> None:
        """What the policy sees of each replica, as gauges: the router's own in-flight count (a completion it never
        saw stays in it), the queued prefill tokens and prefill rate of its snapshot."""
        m = metrics()
        for r in replicas:
            rid = r.replica_id.unique_id
            snap = self._load.snapshot(rid, r.routing_stats or None, r.max_ongoing_requests, now)
            tags = {"model": self._model, "replica": rid, "strategy": self._strategy}
            m.router_outstanding_requests.set(self._load.outstanding(rid), tags=tags)
            m.router_queued_prefill_tokens.set(snap.queued_prefill_tokens, tags=tags)
            m.router_prefill_tokens_per_s.set(snap.prefill_tokens_per_s, tags=tags)

    async def _export_view_forever(self) -> None:
        while True:
            await asyncio.sleep(_SYNC_PERIOD_S)
            try:
                self._export_view(list(self._replicas.values()), self._get_curr_time_s())
            except Exception:  # a gauge must never take the router down
                logger.exception("KVServeRouter: exporting the replica view failed")

    def _sync_subscriptions(self) -> None:
        """Subscribe to every current replica's advertised endpoint (not just one call's candidates).

        A replica counts as live (its precise entries trusted) from its first event batch; until
        then the approximate index serves it.
        """
        if self._subscriber is None:
            return
        try:
            self._subscriber.set_endpoints(
                {
                    r.replica_id.unique_id: (r.routing_stats or {}).get("kv_events_endpoint")
                    for r in self._replicas.values()
                }
            )
        except Exception:
            logger.exception("KVServeRouter: updating KV-event subscriptions failed")

    def _on_kv_event(self, rid: str, event) -> None:
        if rid in self._known or not self._known:
            self._policy.on_event(rid, event)

    def _on_kv_reset(self, rid: str) -> None:
        precise = getattr(self._policy, "precise", None)
        if precise is not None:
            precise.reset_replica(rid)
        metrics().router_kv_event_resets.inc(1, tags={"model": self._model, "replica": rid})

    def _on_batch(self, rid: str, n: int) -> None:
        metrics().router_kv_events.inc(n, tags={"model": self._model, "replica": rid}) if n else None
