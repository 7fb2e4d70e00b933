"""The Serve adapter with fake RunningReplica objects (no Ray cluster): snapshots, decisions,
in-flight accounting, empty stats, replica removal and death, and the deployment option dict."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest
from routers_factories import doc

from deployments.protocol import GenerateRequest
from deployments.request_router import KVServeRouter, request_router_config
from routers.hashing import block_hashes
from routers.types import ReplicaStats
from serve_app.config.routing import RoutingConfig

pytestmark = pytest.mark.unit

DEPLOYMENT = DeploymentID(name="llm", app_name="app")


class FakeReplica:
    """The parts of ``RunningReplica`` the router reads."""

    def __init__(self, uid: str, stats: ReplicaStats | None = None, max_ongoing: int = 64) -> None:
        self.replica_id = ReplicaID(unique_id=uid, deployment_id=DEPLOYMENT)
        self.routing_stats = dataclasses.asdict(stats) if stats else {}
        self.max_ongoing_requests = max_ongoing

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def _stats(uid: str, **kw) -> ReplicaStats:
    base = {"replica_id": uid, "model_id": "m", "block_size": 16, "num_gpu_blocks": 1000, "kv_usage": 0.0,
            "num_running": 0, "num_waiting": 0, "queued_prefill_tokens": 0}
    return ReplicaStats(**{**base, **kw})


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _router(strategy: str = "prefix-aware", clock: Clock | None = None, **routing) -> KVServeRouter:
    r = KVServeRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN,
                      get_curr_time_s=clock or Clock())
    r.initialize_state(**request_router_config(RoutingConfig(strategy=strategy, **routing), model_id="m")[
        "request_router_kwargs"], seed=0)
    return r


def _register(router: KVServeRouter, n: int, **stats) -> list[FakeReplica]:
    """``n`` replicas r0.. with reported stats, given to ``router`` as Serve's replica list."""
    replicas = [FakeReplica(f"r{i}", _stats(f"r{i}", **stats)) for i in range(n)]
    router.update_replicas(replicas)
    return replicas


def _pending(tokens: list[int], n: int, **kw) -> PendingRequest:
    gen = GenerateRequest(request_id=f"req-{n}", model_id="m", prompt_token_ids=tokens, sampling={}, **kw)
    return PendingRequest(args=[gen], kwargs={}, metadata=RequestMetadata(request_id=f"req-{n}",
                                                                          internal_request_id=f"int-{n}"))


async def _send(router: KVServeRouter, replicas, pending) -> str:
    ranked = await router.choose_replicas(replicas, pending)
    chosen = ranked[0][0]
    router.on_request_routed(pending, chosen.replica_id, None)
    return chosen.replica_id.unique_id


def test_request_router_config_is_a_valid_serve_option():
    cfg = request_router_config(RoutingConfig(strategy="kv-aware"), model_id="m", stats_period_s=0.5)
    parsed = RequestRouterConfig(**cfg)
    assert parsed.request_router_kwargs["routing"]["strategy"] == "kv-aware"
    assert cfg["request_router_class"] == "deployments.request_router:KVServeRouter"
    assert parsed.request_routing_stats_period_s == 0.5


def test_request_router_class_replaces_kvserves_router_with_its_kwargs():
    routing = RoutingConfig(request_router_class="benchmarks.routing_h2h.ray_router:RayPrefixCacheAffinity",
                            request_router_kwargs={"imbalanced_threshold": 10})
    cfg = request_router_config(routing, model_id="m")
    parsed = RequestRouterConfig(**cfg)
    assert cfg["request_router_class"] == "benchmarks.routing_h2h.ray_router:RayPrefixCacheAffinity"
    assert parsed.request_router_kwargs == {"imbalanced_threshold": 10}


def test_shared_prefix_follows_the_first_replica_and_ranks_the_rest_as_fallback():
    async def go():
        router = _router()
        replicas = _register(router, 3)
        first = await _send(router, replicas, _pending(doc(1) + [1, 2], 1))
        ranked = await router.choose_replicas(replicas, _pending(doc(1) + [3, 4], 2))
        return first, ranked

    first, ranked = asyncio.run(go())
    assert ranked[0][0].replica_id.unique_id == first
    assert len(ranked[1]) == 2 and all(r.replica_id.unique_id != first for r in ranked[1])


class _Recorder:
    """Stands in for deployments.metrics.metrics(): records (metric name, value) of every inc/observe/set."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float]] = []

    def __getattr__(self, name: str) -> SimpleNamespace:
        def record(value: float, tags: dict | None = None) -> None:
            self.seen.append((name, value))

        return SimpleNamespace(inc=record, observe=record, set=record)


def test_predictions_stay_in_the_router_and_are_settled_from_the_replicas_reports(monkeypatch):
    rec = _Recorder()
    # the globals the router's methods read (in a long test session the module object imported here may not be
    # the one the class's functions were defined in)
    monkeypatch.setitem(KVServeRouter._settle.__globals__, "metrics", lambda: rec)

    async def go():
        router = _router()
        replicas = _register(router, 2)
        first = _pending(doc(1) + [1, 2], 1)
        before = dataclasses.replace(first.args[0])
        await _send(router, replicas, first)
        second = _pending(doc(1) + [3, 4], 2)
        chosen = await _send(router, replicas, second)
        assert first.args[0] == before  # the router does not write into the request
        # The replica that served both reports what its engine found cached (req-2: the document, minus 16).
        actual = len(doc(1)) // 16 * 16 - 16
        r = next(x for x in replicas if x.replica_id.unique_id == chosen)
        r.routing_stats = dataclasses.asdict(_stats(chosen, recent_cached_tokens=(("req-1", 0), ("req-2", actual))))
        await router.choose_replicas(replicas, _pending([9] * 40, 3))  # the next decision reads the report
        again = [x for x in rec.seen if x[0] == "router_prediction_error_tokens"]
        await router.choose_replicas(replicas, _pending([9] * 40, 4))  # the same report: not counted twice
        return again, [x for x in rec.seen if x[0] == "router_prediction_error_tokens"], actual

    first_errors, later_errors, _actual = asyncio.run(go())
    # req-1 was predicted 0 and found 0; req-2 predicted the whole document (its full blocks), found 16 less
    assert sorted(v for _, v in first_errors) == [0, 16]
    assert later_errors == first_errors


def test_precomputed_block_hashes_are_used_as_given():
    async def go():
        router = _router()
        replicas = _register(router, 2)
        hashes = tuple(block_hashes(doc(2), 16))
        first = await _send(router, replicas, _pending(doc(2), 1, block_hashes=hashes))
        assert router._policy.approx.match(hashes, ["r0", "r1"]) == {first: 16}

    asyncio.run(go())


def test_in_flight_accounting_spreads_a_burst_of_cold_requests():
    async def go():
        router = _router(clock=Clock())
        replicas = _register(router, 4)
        picks = [await _send(router, replicas, _pending(doc(100 + i), i)) for i in range(4)]
        return picks, router

    picks, router = asyncio.run(go())
    assert sorted(picks) == ["r0", "r1", "r2", "r3"]  # stats are stale; own accounting sees the queue
    for i, rid in enumerate(picks):
        router.on_request_completed(ReplicaID(unique_id=rid, deployment_id=DEPLOYMENT), f"int-{i}")
    assert all(router._load.outstanding(f"r{i}") == 0 for i in range(4))


def test_a_burst_decided_before_serve_reports_any_routing_still_spreads():
    """Serve's routing task decides every pending request of a burst before any ``on_request_routed``."""
    async def go():
        clock = Clock()
        router = _router("kv-aware", clock=clock)
        replicas = _register(router, 4)
        pendings = [_pending(doc(200 + i), i) for i in range(8)]
        ranked = [await router.choose_replicas(replicas, p) for p in pendings]
        picks = [r[0][0].replica_id.unique_id for r in ranked]
        counted = {f"r{i}": router._load.outstanding(f"r{i}") for i in range(4)}
        for p, r in zip(pendings, ranked, strict=True):
            router.on_request_routed(p, r[0][0].replica_id, None)
        return picks, counted, router

    picks, counted, router = asyncio.run(go())
    assert sorted(picks) == ["r0", "r0", "r1", "r1", "r2", "r2", "r3", "r3"]
    assert counted == {"r0": 2, "r1": 2, "r2": 2, "r3": 2}  # counted at the decision
    assert all(router._load.outstanding(f"r{i}") == 2 for i in range(4))  # and not again when routed


def test_a_decision_serve_did_not_follow_moves_retries_once_and_expires_unrouted():
    async def go():
        clock = Clock()
        router = _router("kv-aware", clock=clock)
        replicas = _register(router, 2)
        load = router._load
        p0 = _pending(doc(300), 0)
        first = (await router.choose_replicas(replicas, p0))[0][0].replica_id
        other = next(r.replica_id for r in replicas if r.replica_id != first)
        router.on_request_routed(p0, other, None)  # the chosen queue was full: Serve used the other one
        moved = (load.outstanding(first.unique_id), load.outstanding(other.unique_id))
        p1 = _pending(doc(301), 1)
        await router.choose_replicas(replicas, p1)
        await router.choose_replicas(replicas, p1)  # Serve retries the same request
        retried = load.outstanding("r0") + load.outstanding("r1")
        p2 = _pending(doc(302), 2)
        await router.choose_replicas(replicas, p2)
        router.on_request_completed(other, "int-2")  # cancelled before routing
        cancelled = load.outstanding("r0") + load.outstanding("r1")
        clock.t += 31.0  # p1 was never routed: the next decision's sync takes it back
        await router.choose_replicas(replicas, _pending(doc(303), 3))
        expired = load.outstanding("r0") + load.outstanding("r1")
        return moved, retried, cancelled, expired

    moved, retried, cancelled, expired = asyncio.run(go())
    assert moved == (0, 1)
    assert retried == 2  # p0 and one count for p1
    assert cancelled == 2
    assert expired == 2  # p0 (routed) and p3 (just decided); p1 expired


def test_empty_routing_stats_degrade_to_least_loaded_with_a_reason():
    async def go():
        router = _router()
        replicas = [FakeReplica("a"), FakeReplica("b")]
        router.update_replicas(replicas)
        first = await _send(router, replicas, _pending(doc(3), 1))
        ranked = await router.choose_replicas(replicas, _pending(doc(3), 2))
        return router, first, ranked

    router, first, ranked = asyncio.run(go())
    assert router._pending["int-2"][1].reason == "no-stats"
    assert ranked[0][0].replica_id.unique_id != first  # went to the idle one
    assert router._load.outstanding("a") == router._load.outstanding("b") == 1


def test_removed_and_dead_replicas_are_dropped_without_errors():
    async def go():
        router = _router()
        replicas = _register(router, 3)
        first = await _send(router, replicas, _pending(doc(4), 1))
        survivors = [r for r in replicas if r.replica_id.unique_id != first]
        router.update_replicas(survivors)
        assert router._policy.approx.size(first) == 0
        second = await _send(router, survivors, _pending(doc(4), 2))
        router.on_replica_actor_died(ReplicaID(unique_id=second, deployment_id=DEPLOYMENT))
        router.on_replica_actor_died(ReplicaID(unique_id="unknown", deployment_id=DEPLOYMENT))
        router.on_request_completed(ReplicaID(unique_id=second, deployment_id=DEPLOYMENT), "int-2")
        return router, second

    router, second = asyncio.run(go())
    assert router._policy.approx.size(second) == 0 and router._load.outstanding(second) == 0


def test_non_generate_requests_and_missing_request_fall_back_to_serve():
    async def go():
        router = _router()
        replicas = [FakeReplica("a", _stats("a"))]
        router.update_replicas(replicas)
        plain = PendingRequest(args=["hello"], kwargs={}, metadata=RequestMetadata("x", "int-x"))
        return await router.choose_replicas(replicas, plain), await router.choose_replicas(replicas, None)

    a, b = asyncio.run(go())
    assert len(a) == 1 and len(a[0]) == 1 and b == a


def test_round_robin_strategy():
    async def go():
        router = _router("round-robin")
        replicas = _register(router, 2)
        return [await _send(router, replicas, _pending(doc(5), i)) for i in range(4)]

    assert asyncio.run(go()) == ["r0", "r1", "r0", "r1"]


def test_kv_aware_subscribes_to_reported_endpoints_and_follows_events():
    from test_routers_events import FakePublisher, _batch, _stored, until

    from deployments.kv_events import advertised_endpoint

    pub = FakePublisher()

    async def go():
        router = _router("kv-aware")
        ep = advertised_endpoint("127.0.0.1", pub.port, pub.replay_port)
        replicas = [FakeReplica("r0", _stats("r0")), FakeReplica("r1", _stats("r1", kv_events_endpoint=ep))]
        router.update_replicas(replicas)
        await router.choose_replicas(replicas, _pending(doc(7), 0))  # starts the subscription
        await asyncio.sleep(0.3)
        pub.publish(_batch(_stored(block_hashes(doc(7), 16))))
        await until(lambda: router._policy.precise.size("r1") > 0)
        ranked = await router.choose_replicas(replicas, _pending(doc(7), 1))
        reason = router._pending["int-1"][1].reason
        router.update_replicas(replicas[:1])  # r1 leaves: its subscription and entries go
        await asyncio.sleep(0.05)
        subscribed = router._subscriber.endpoints()
        await router._subscriber.close()
        return ranked, reason, subscribed, router

    try:
        ranked, reason, subscribed, router = asyncio.run(go())
    finally:
        pub.close()
    assert ranked[0][0].replica_id.unique_id == "r1" and reason == "cache-hit"
    assert subscribed == {} and router._policy.precise.size("r1") == 0


def test_a_policy_failure_falls_back_to_serves_choice():
    async def go():
        router = _router()
        replicas = [FakeReplica("a", _stats("a")), FakeReplica("b", _stats("b"))]
        router.update_replicas(replicas)

        def broken(*args, **kwargs):
            raise RuntimeError("bug")

        router._policy.choose = broken
        return await router.choose_replicas(replicas, _pending(doc(6), 1)), replicas

    ranked, replicas = asyncio.run(go())
    assert ranked == [replicas]


def test_the_load_the_policy_saw_is_exported_at_most_once_a_second(monkeypatch):
    seen: list[tuple[str, float, dict]] = []

    class Rec:
        def __getattr__(self, name: str) -> SimpleNamespace:
            def record(value: float, tags: dict | None = None) -> None:
                seen.append((name, value, tags or {}))

            return SimpleNamespace(inc=record, observe=record, set=record)

    monkeypatch.setitem(KVServeRouter._maybe_sync.__globals__, "metrics", lambda: Rec())
    clock = Clock()

    async def go():
        router = _router(clock=clock)
        replicas = _register(router, 2, prefill_tokens_per_s=100.0)
        await _send(router, replicas, _pending(doc(200), 0))  # first decision: exported (itself counted)
        await _send(router, replicas, _pending(doc(201), 1))  # same second: not exported
        clock.t += 1.5
        await _send(router, replicas, _pending(doc(202), 2))  # exported: three requests over the two replicas

    asyncio.run(go())
    outstanding = [v for n, v, t in seen if n == "router_outstanding_requests"]
    assert len(outstanding) == 4 and sorted(outstanding[:2]) == [0, 1] and sorted(outstanding[2:]) == [1, 2]
    rates = {(t["replica"], v) for n, v, t in seen if n == "router_prefill_tokens_per_s"}
    assert rates == {("r0", 100.0), ("r1", 100.0)}
    queued = [v for n, v, t in seen if n == "router_queued_prefill_tokens"]
    assert len(queued) == 4 and min(queued[:2]) == 0 < max(queued[:2]) and all(q > 0 for q in queued[2:])
    assert {t["strategy"] for n, _, t in seen if n.startswith("router_outstanding")} == {"prefix-aware"}


def test_the_view_is_exported_every_period_without_decisions(monkeypatch):
    rec = _Recorder()
    monkeypatch.setitem(KVServeRouter._export_view.__globals__, "metrics", lambda: rec)
    monkeypatch.setitem(KVServeRouter._export_view.__globals__, "_SYNC_PERIOD_S", 0.01)

    async def go():
        router = _router(strategy="round-robin")
        replicas = _register(router, 2)
        await _send(router, replicas, _pending(doc(300), 0))
        after_decision = len(view())
        await asyncio.sleep(0.1)  # no decisions: the task keeps the gauges fresh (one request still outstanding)
        return after_decision

    def view() -> list[tuple[str, float]]:
        return [x for x in rec.seen if x[0].startswith(("router_outstanding", "router_queued", "router_prefill"))]

    after_decision = asyncio.run(go())
    assert after_decision == 6 and len(view()) >= 12
    assert sorted(v for n, v in view()[-6:] if n == "router_outstanding_requests") == [0, 1]
