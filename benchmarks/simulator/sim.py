"""Discrete-event simulation of a kvserve cluster: ingress replicas running the production routers/
policies in front of modelled vLLM replicas (``engine.EngineModel``), with an optional shared KV tier.

Owns ``ClusterSpec``, ``Autoscale``, ``simulate`` and ``Cluster``, one run: its event heap, the
ingresses, the replicas and the shared tier, with the behaviour split by noun into mixins:
``path.RequestPath`` (client, ingress CPUs, routing, streaming back), ``scheduler.Scheduler`` (each
replica's vLLM step loop and KV admission) and ``fleet.Fleet`` (replicas added, reporting, failed,
scaled). Per ingress replica: its own policy (the Ray twin's tree, ``ray_twin.py``, is one for all),
``routers.load.LoadTracker`` and RNG; it sees only its own routing decisions, the replicas' periodic
reports (``stats_period_s``, shared by all ingresses) and, for kv-aware, the replicas' KV events
``event_lag_s`` after they happen. Before its scheduler, each replica has its own front end (vLLM's
input processing), a FIFO server of ``input_s_per_request``. A failed replica's requests are re-sent
through the ingresses (TTFT still counts from the first send); autoscaling adds cold replicas after
``start_s`` and retires idle ones.
Events at the same time run in the order they were pushed.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.fleet import Fleet
from benchmarks.simulator.frontend import PSServer, QueueServer
from benchmarks.simulator.load import Driver
from benchmarks.simulator.path import Ingress, RequestPath
from benchmarks.simulator.ray_twin import RAY_TWIN, RayPrefixAffinity, RayTree, ray_knobs
from benchmarks.simulator.replica import ObjectTier
from benchmarks.simulator.result import Result, deep_size
from benchmarks.simulator.scheduler import Scheduler
from deployments.pacing import LoopLag
from routers.load import LoadTracker
from routers.policy import Knobs, make_policy
from serve_app.config.routing import RoutingConfig

#: Strategies whose ingress hashes each prompt's blocks (``deployments/ingress.py``); the others route without.
HASHING = ("prefix-aware", "kv-aware")


@dataclass(frozen=True, slots=True)
class Autoscale:
    min_replicas: int
    max_replicas: int
    target_ongoing: float = 8.0
    period_s: float = 5.0
    start_s: float = 60.0


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    replicas: int
    ingresses: int = 1
    event_lag_s: float = 0.0
    tier_budget_blocks: int = 0  # 0: no KV tier
    failures: tuple[tuple[float, int], ...] = ()  # (time, replica index)
    autoscale: Autoscale | None = None
    measure_memory: bool = False
    #: the prefill speed a replica reports: "measured" as deployments/vllm_replica.py measures it
    #: (routers.prefill_meter, from the routing to the first token), "nominal" the engine model's uncontended speed.
    rate_report: str = "measured"


@dataclass
class _State:
    reps: dict = field(default_factory=dict)
    gpus: dict = field(default_factory=dict)
    live: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def strategy_knobs(strategy: str, **overrides) -> Knobs:
    """``RoutingConfig``'s knobs for ``strategy``; the Ray twin (``ray_twin.RAY_TWIN``) reads none of them and
    takes round-robin's, renamed."""
    if strategy == RAY_TWIN:
        return ray_knobs(RoutingConfig(strategy="round-robin", **overrides).knobs())
    return RoutingConfig(strategy=strategy, **overrides).knobs()


def simulate(driver: Driver, knobs: Knobs, cluster: ClusterSpec, engine: EngineModel, *, seed: int = 0,
             measure_from: int = 0, ray_tree: RayTree | None = None, keep_requests: bool = False) -> Result:
    """Run ``driver``'s load through the cluster; returns the per-request record and the router costs.

    Requests sent before the ``measure_from``-th one warm the caches and are not in the samples,
    token counts or throughput (routing costs count them all). ``ray_tree``: the tree Ray's twin starts from
    (and updates), as a deployment's tree actor outlives one benchmark cell; a new empty one when None.
    ``keep_requests``: ``Result.requests`` holds a row per measured request (its replica, send time, TTFT, end),
    shaped as ``kvserve bench --per-request`` rows.
    """
    return Cluster(driver, knobs, cluster, engine, seed=seed, measure_from=measure_from, ray_tree=ray_tree,
                   keep_requests=keep_requests).run()


class Cluster(RequestPath, Scheduler, Fleet):
    """One simulated run: the shared state every mixin reads, the event heap and its loop."""

    def __init__(self, driver: Driver, knobs: Knobs, cluster: ClusterSpec, engine: EngineModel, *, seed: int,
                 measure_from: int, ray_tree: RayTree | None = None, keep_requests: bool = False) -> None:
        self.driver, self.cluster, self.engine, self.measure_from = driver, cluster, engine, measure_from
        self.res = Result(knobs.strategy, requests=[] if keep_requests else None)
        self.bs = engine.block_size
        self.tier = ObjectTier(cluster.tier_budget_blocks) if cluster.tier_budget_blocks > 0 else None
        self.ings = []
        self.balanced = -1  # the ingress leastconn picked last (RequestPath.balance)
        if knobs.strategy == RAY_TWIN:  # Ray's one tree actor, shared by every router
            ray_tree = ray_tree if ray_tree is not None else RayTree()
        else:
            ray_tree = None
        for i in range(max(1, cluster.ingresses)):
            policy = RayPrefixAffinity(knobs, ray_tree) if ray_tree is not None else make_policy(knobs)
            load = LoadTracker(default_prefill_s_per_token=knobs.prefill_s_per_token,
                               measured_speed=knobs.measured_prefill_speed)
            self.ings.append(Ingress(policy, load, random.Random(f"{seed}/ingress/{i}"),
                                     getattr(policy, "precise", None)))
        self.precise = self.ings[0].precise is not None
        self.tree_calls = ray_tree is not None  # Ray's router calls its tree actor on the loop (engine.tree_call_*)
        self.hashing = knobs.strategy in HASHING  # the ingress hashes prompts for these (deployments/ingress.py)
        self.ps = engine.frontend_sharing == "ps"
        self.loop = engine.frontend_sharing == "loop"  # chunks and a request's hops through each ingress's loop
        self.replica_loop = LoopLag(0.0)  # "loop": the replicas' own loops are never behind (not modelled)
        # tokens reach the client through the ingress's PS core
        self.ing_tok = self.ps and engine.frontend_s_per_token > 0
        # the load generator's cores (engine.client_s_per_*, one per bench process; a request is served by one;
        # engine.client_sharing: processor sharing or its callbacks in order)
        core = QueueServer if engine.client_sharing == "fifo" else PSServer
        self.clients = [core() for _ in range(engine.client_cores)]
        self.cli_req, self.cli_tok = engine.client_s_per_request > 0, engine.client_s_per_token > 0
        self.st = _State()
        self.heap: list = []
        self.seq = 0
        self.outstanding = 0

    def push(self, t: float, kind: str, payload: object) -> None:
        heapq.heappush(self.heap, (t, self.seq, kind, payload))
        self.seq += 1

    def run(self) -> Result:
        cluster, engine, res, st, heap = self.cluster, self.engine, self.res, self.st, self.heap
        push = self.push
        for _ in range(cluster.replicas):
            self.add_replica(0.0, ready=True)
        for t, idx in cluster.failures:
            push(t, "fail", idx)
        if cluster.autoscale is not None:
            push(cluster.autoscale.period_s, "scale", None)
        tick = self.driver.begin(self.send)
        if tick is not None:
            push(tick, "tick", None)
        now, last_t, gpus = 0.0, 0.0, self.gpu_count()
        while heap:
            now, _, kind, payload = heapq.heappop(heap)
            res.gpu_seconds += gpus * (now - last_t)
            last_t = now
            if kind == "stats":
                if payload.alive:
                    st.stats[payload.rid] = self.report(payload, now)
                    push(now + engine.stats_period_s, "stats", payload)
            elif kind == "arrive":
                self.arrive(payload, now)
            elif kind == "send":  # the client builds and sends it on its core, then the ingress has it
                core = self.client_of(payload)
                core.add(now, (payload.rid, payload.attempts), engine.client_s_per_request,
                         ("arrive", payload, payload.attempts))
                self.wake_client(core)
            elif kind == "client":
                core, version = payload
                if version == core.version:
                    self.client_due(core, now)
            elif kind == "to_client":
                what, turn, attempt = payload
                if attempt == turn.attempts:
                    self.to_client(what, turn, now)
            elif kind == "route":
                self.route(payload, now)
            elif kind == "decide":
                turn, attempt = payload
                if attempt == turn.attempts:
                    self.decide(turn, now)
            elif kind == "accepted":
                self.accepted(*payload, now)
            elif kind == "hop":
                self.hop(*payload, now)
            elif kind == "frontend":
                if payload[1] == payload[0].cpu.version:
                    self.frontend(payload[0], now)
            elif kind == "enqueue":
                payload[0].entering -= 1
                self.enqueue(*payload, now)
            elif kind == "tick":
                tick = self.driver.tick(now, self.send)
                if tick is not None:
                    push(tick, "tick", None)
            elif kind == "step":
                rep, chunks = payload
                if rep.alive:
                    self.end_step(rep, chunks, now)
            elif kind == "wake":
                self.kick(payload, now)
            elif kind == "events":
                self.apply_events(*payload)
            elif kind == "fail":
                rep = st.reps.get(f"r{payload:04d}")
                if rep is not None and rep.alive:
                    self.fail(rep, now)
            elif kind == "ready":
                if payload.alive:
                    self.go_live(payload, now)
            elif kind == "scale" and (self.outstanding or tick is not None):
                self.autoscale(now)
                push(now + cluster.autoscale.period_s, "scale", None)
            gpus = self.gpu_count() if kind in ("fail", "ready", "scale") else gpus
            if self.outstanding == 0 and tick is None and kind in ("step", "tick", "frontend", "client", "to_client"):
                break
        res.replicas_end = sum(1 for r in st.reps.values() if r.alive)
        res.gpus_end = gpus
        res.per_replica = {rid: r.served for rid, r in st.reps.items()}
        if cluster.measure_memory:
            res.index_bytes_per_ingress = deep_size(self.ings[0].policy)
        return res
