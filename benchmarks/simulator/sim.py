"""Discrete-event simulation of a kvserve cluster: ingress replicas running the production routers/
policies in front of modelled vLLM replicas (``engine.EngineModel``), with an optional shared KV tier.

Owns ``ClusterSpec``, ``Autoscale`` and ``simulate``. Per ingress replica: its own policy,
``routers.load.LoadTracker`` and RNG, exactly as ``deployments/request_router.py`` wires them; it
sees only its own routing decisions, the replicas' periodic reports (``stats_period_s``, shared by
all ingresses) and, for kv-aware, the replicas' KV events ``event_lag_s`` after they happen.
Requests are spread over ingresses round-robin (a load balancer in front).

Replica side (``replica.py``, costs in ``engine.py``): vLLM's step loop. Each step decodes one token
for every running request and gives the rest of the ``chunk_tokens`` budget to prefill chunks, oldest
waiting request first. A request's reused prefix is looked up when the scheduler first reaches it
(GPU blocks, then tier blocks, loaded at ``tier_gbps`` plus a fixed ``tier_hit_s`` before its first chunk); its blocks are cached
(and, with the tier, written to it) when its prefill completes, which is its first token. Before its
scheduler, each replica has its own front end (vLLM's input processing), a FIFO server of
``input_s_per_request``. Each ingress's CPU (``frontend.py``, costs in ``engine.py``) delays the
route, the first token and, with processor sharing, the client's completion. The load generator's
own core (``engine.client_s_per_*``, one ``PSServer`` for the whole run) builds each request before
the ingress sees it and reads every streamed token: the client's TTFT is its first token read, and a
closed-loop worker sends its next request once it has read the last. A failed replica's
requests are re-sent through the ingresses (TTFT still counts from the first send); autoscaling adds
cold replicas after ``start_s`` and retires idle ones.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from dataclasses import dataclass, field

from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.frontend import FifoServer, PSServer
from benchmarks.simulator.load import Driver, Turn
from benchmarks.simulator.replica import Job, ObjectTier, Replica
from benchmarks.simulator.result import Result, deep_size
from routers.events import BlockRemoved, BlockStored
from routers.load import LoadTracker
from routers.policy import Knobs, make_policy
from routers.types import RoutingRequest


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


@dataclass(eq=False)
class _Ingress:
    policy: object
    load: LoadTracker
    rng: random.Random
    precise: object | None = None
    fifo: FifoServer = field(default_factory=FifoServer)  # its CPU, frontend_sharing "fifo"
    cpu: PSServer = field(default_factory=PSServer)  # its CPU, frontend_sharing "ps"


@dataclass
class _State:
    reps: dict = field(default_factory=dict)
    gpus: dict = field(default_factory=dict)
    live: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def simulate(driver: Driver, knobs: Knobs, cluster: ClusterSpec, engine: EngineModel, *, seed: int = 0,
             measure_from: int = 0) -> Result:
    """Run ``driver``'s load through the cluster; returns the per-request record and the router costs.

    Requests sent before the ``measure_from``-th one warm the caches and are not in the samples,
    token counts or throughput (routing costs count them all).
    """
    res = Result(knobs.strategy)
    bs = engine.block_size
    tier = ObjectTier(cluster.tier_budget_blocks) if cluster.tier_budget_blocks > 0 else None
    ings = []
    for i in range(max(1, cluster.ingresses)):
        policy = make_policy(knobs)
        ings.append(_Ingress(policy, LoadTracker(default_prefill_s_per_token=knobs.prefill_s_per_token),
                             random.Random(f"{seed}/ingress/{i}"), getattr(policy, "precise", None)))
    precise = ings[0].precise is not None
    ps = engine.frontend_sharing == "ps"
    ing_tok = ps and engine.frontend_s_per_token > 0  # tokens reach the client through the ingress's PS core
    client = PSServer()  # the load generator's one core (engine.client_s_per_*)
    cli_req, cli_tok = engine.client_s_per_request > 0, engine.client_s_per_token > 0
    st = _State()
    heap: list = []
    seq = 0

    def push(t: float, kind: str, payload: object) -> None:
        nonlocal seq
        heapq.heappush(heap, (t, seq, kind, payload))
        seq += 1

    def add_replica(now: float, ready: bool) -> Replica:
        idx = len(st.reps)
        rep = Replica(f"r{idx:04d}", idx // engine.replicas_per_gpu, engine.kv_blocks, ready=ready)
        st.reps[rep.rid] = rep
        st.gpus.setdefault(rep.gpu, []).append(rep)
        st.stats[rep.rid] = {}
        if ready:
            go_live(rep, now)
        return rep

    def go_live(rep: Replica, now: float) -> None:
        rep.ready = True
        st.live.append(rep.rid)
        for ing in ings:
            if ing.precise is not None:
                ing.precise.mark_live(rep.rid)
        push(now, "stats", rep)

    def peers_busy(rep: Replica) -> int:
        return sum(1 for p in st.gpus[rep.gpu] if p is not rep and p.alive and p.stepping)

    def report(rep: Replica, now: float) -> dict:
        queued = sum(j.remaining if j.looked_up else j.turn.prompt_tokens - rep.gpu_prefix(j.turn.block_hashes) * bs
                     for j in rep.waiting)
        return {"block_size": bs, "num_gpu_blocks": engine.kv_blocks, "num_running": rep.running,
                "num_waiting": len(rep.waiting), "queued_prefill_tokens": int(queued),
                "prefill_tokens_per_s": rep.meter.rate if cluster.rate_report == "measured" else engine.prefill_tokens_per_s,
                "timestamp": now,
                "kv_usage": len(rep.lru) / engine.kv_blocks}

    def emit(rep: Replica, events: list, now: float) -> None:
        if not precise or not events:
            return
        if cluster.event_lag_s > 0:
            push(now + cluster.event_lag_s, "events", (rep, events))
        else:
            apply_events(rep, events)

    def apply_events(rep: Replica, events: list) -> None:
        if not rep.alive:
            return
        t0 = time.perf_counter()
        for ing in ings:
            for ev in events:
                ing.policy.on_event(rep.rid, ev)
        res.event_apply_s += time.perf_counter() - t0
        res.events_applied += len(events) * len(ings)

    def arrive(turn: Turn, now: float) -> None:
        ing = ings[(turn.rid + turn.attempts) % len(ings)]
        turn.ingress = ing
        if engine.frontend_s_per_request <= 0:
            route(turn, now)
        elif ps:
            ing.cpu.add(now, (turn.rid, turn.attempts), engine.frontend_s_per_request, ("route", turn, turn.attempts))
            wake(ing)
        else:
            push(ing.fifo.work(now, engine.frontend_s_per_request), "route", turn)

    def wake(ing: _Ingress) -> None:
        """Schedule ``ing``'s processor-sharing CPU to hand back its next mark (earlier wake-ups go stale)."""
        t = ing.cpu.next_time()
        ing.cpu.version += 1
        if t is not None:
            push(t, "frontend", (ing, ing.cpu.version))

    def frontend(ing: _Ingress, now: float) -> None:
        for what, turn, attempt in ing.cpu.due(now):
            if attempt != turn.attempts:
                continue  # sent again meanwhile (its replica failed): that stream is gone
            if what == "route":
                route(turn, now)
            else:
                to_client(what, turn, now)
        wake(ing)

    def to_client(what: str, turn: Turn, now: float) -> None:
        """The ingress streamed ``turn``'s first or last token: the client reads it (its core, if costly)."""
        if not cli_tok:
            (seen_first if what == "first" else seen_last)(turn, now)
            return
        client.add(now, (turn.rid, turn.attempts), engine.client_s_per_token, (what, turn, turn.attempts))
        wake_client()

    def wake_client() -> None:
        t = client.next_time()
        client.version += 1
        if t is not None:
            push(t, "client", client.version)

    def client_due(now: float) -> None:
        for what, turn, attempt in client.due(now):
            if attempt != turn.attempts:
                continue
            if what == "arrive":
                arrive(turn, now)
            elif what == "first":
                seen_first(turn, now)
            else:
                seen_last(turn, now)
        wake_client()

    def stream(rep: Replica, tokens: int, now: float) -> None:
        """``tokens`` output tokens leave ``rep`` (one per running request): frontend work. FIFO: spread over
        the ingresses; PS: each on its request's stream, the last one marked."""
        if not tokens:
            return
        if engine.frontend_s_per_token > 0 and not ps:
            per = engine.frontend_s_per_token * tokens / len(ings)
            for ing in ings:
                ing.fifo.work(now, per)
        if not (ing_tok or cli_tok):
            return
        k, touched = rep.steps, set()
        for step, jobs in rep.finishing.items():
            for job in jobs:
                turn, key = job.turn, (job.turn.rid, job.turn.attempts)
                if ing_tok:
                    turn.ingress.cpu.add(now, key, engine.frontend_s_per_token,
                                         ("last", turn, turn.attempts) if step == k else None)
                    touched.add(turn.ingress)
                if cli_tok and step != k:  # the last token reaches the client through to_client
                    client.add(now, key, engine.client_s_per_token)
        for ing in touched:
            wake(ing)
        if cli_tok:
            wake_client()

    def route(turn: Turn, now: float) -> None:
        ing = turn.ingress
        t0 = time.perf_counter()
        snaps = [ing.load.snapshot(rid, st.stats[rid], engine.max_ongoing, now) for rid in st.live]
        sticky = turn.session.key if turn.session is not None and turn.session.sticky else None
        rr = RoutingRequest("sim", turn.prompt_tokens, turn.block_hashes, sticky)
        d = ing.policy.choose(rr, snaps, now, ing.rng)
        snap = next(s for s in snaps if s.replica_id == d.replica_id)
        ing.policy.on_routed(rr, snap, now)
        ing.load.on_routed(d.replica_id, str(turn.rid), turn.prompt_tokens - d.predicted_cached_tokens, now)
        res.decision_s.append(time.perf_counter() - t0)
        res.reasons[d.reason] += 1
        res.predicted_cached_tokens += d.predicted_cached_tokens
        rep = st.reps[d.replica_id]
        rep.served += 1
        rep.meter.started(now)
        if engine.input_s_per_request > 0:
            rep.input_until = max(now, rep.input_until) + engine.input_s_per_request
            rep.entering += 1
            push(rep.input_until, "enqueue", (rep, turn))
        else:
            enqueue(rep, turn, now)

    def enqueue(rep: Replica, turn: Turn, now: float) -> None:
        """``turn`` reaches ``rep``'s scheduler; one sent to a replica that died meanwhile is sent again."""
        if not rep.alive:
            turn.attempts += 1
            res.retries += 1
            push(now, "arrive", turn)
            return
        rep.waiting.append(Job(turn))
        kick(rep, now)

    def lookup(rep: Replica, job: Job, now: float) -> None:
        """The scheduler first sees ``job``: reuse the GPU prefix, then what the tier holds after it."""
        hashes, prompt = job.turn.block_hashes, job.turn.prompt_tokens
        gpu = rep.gpu_prefix(hashes)
        extra = tier.prefix(hashes, gpu) if tier is not None else 0
        job.cached = min(gpu * bs, max(prompt - 1, 0))
        job.from_tier = max(0, min((gpu + extra) * bs, max(prompt - 1, 0)) - job.cached)
        rep.touch(hashes[:gpu])
        if job.from_tier:
            tier.touch(hashes[gpu: gpu + extra])
            job.ready_at = now + engine.tier_ready_s(job.from_tier)
        job.remaining = prompt - job.cached - job.from_tier
        job.looked_up = True
        if job.turn.rid < measure_from:
            return
        res.prompt_tokens += prompt
        res.cached_tokens += job.cached
        res.tier_tokens += job.from_tier

    def kick(rep: Replica, now: float) -> None:
        if rep.stepping or not rep.alive:
            return
        budget = engine.chunk_tokens - rep.running
        chunks, prefill_s, wake = [], 0.0, None
        for job in rep.waiting:
            if budget <= 0:
                break
            if not job.looked_up:
                lookup(rep, job, now)
            if engine.kv_admission and not job.admitted and not rep.admit(job, engine.kv_blocks, bs):
                break  # vLLM schedules its waiting queue in order: the head waits for blocks
            if job.ready_at > now:
                wake = job.ready_at if wake is None else min(wake, job.ready_at)
                continue
            take = min(budget, job.remaining)
            done_before = job.turn.prompt_tokens - job.cached - job.from_tier - job.remaining
            prefill_s += engine.prefill_chunk_s(take, job.cached + job.from_tier + done_before)
            chunks.append((job, take))
            budget -= take
        if not chunks and rep.running == 0:
            if wake is not None:
                push(wake, "wake", rep)
            return
        rep.stepping = True
        dur = engine.step_time_s(rep.running, rep.context_tokens, prefill_s, peers_busy(rep))
        res.busy_s += dur
        push(now + dur, "step", (rep, chunks))

    def end_step(rep: Replica, chunks: list, now: float) -> None:
        rep.stepping = False
        rep.steps += 1
        k = rep.steps
        stream(rep, rep.running, now)
        rep.context_tokens += rep.running
        for job in rep.finishing.pop(k, ()):
            complete(rep, job, now)
        for job, take in chunks:
            job.remaining -= take
            if job.remaining == 0:
                rep.waiting.remove(job)
                first_token(rep, job, k, now)
        kick(rep, now)

    def first_token(rep: Replica, job: Job, k: int, now: float) -> None:
        turn = job.turn
        if ing_tok:
            turn.first_at = now
            last = turn.output_tokens <= 1
            turn.ingress.cpu.add(now, (turn.rid, turn.attempts), engine.frontend_s_per_token,
                                 ("last" if last else "first", turn, turn.attempts))
            wake(turn.ingress)
        elif cli_tok:  # the client reads it once the ingress's FIFO (if costly) has passed it on
            turn.first_at = now
            seen = turn.ingress.fifo.work(now, engine.frontend_s_per_token) if engine.frontend_s_per_token > 0 else now
            push(seen, "to_client", ("first", turn, turn.attempts))
        elif not turn.first_token:
            turn.first_token = True
            turn.first_at = now
            if turn.rid >= measure_from:
                seen = turn.ingress.fifo.work(now, engine.frontend_s_per_token) if engine.frontend_s_per_token > 0 else now
                res.ttft_s.append(seen - turn.sent_at + engine.request_overhead_s)
        rep.meter.first_output(now, turn.prompt_tokens - job.cached)
        stored, removed = rep.insert(turn.block_hashes)
        events = ([BlockStored(tuple(stored), "GPU")] if stored else []) + ([BlockRemoved(tuple(removed), "GPU")] if removed else [])
        emit(rep, events, now)
        if tier is not None:
            put, evicted = tier.put(turn.block_hashes, rep.rid)
            if put:
                emit(rep, [BlockStored(tuple(put), "OBJ")], now)
            for who, hs in evicted.items():
                if who in st.reps:
                    emit(st.reps[who], [BlockRemoved(tuple(hs), "OBJ")], now)
        rep.running += 1
        rep.context_tokens += turn.prompt_tokens + 1
        if turn.output_tokens <= 1:
            complete(rep, job, now)
        else:
            rep.finishing.setdefault(k + turn.output_tokens - 1, []).append(job)

    def complete(rep: Replica, job: Job, now: float) -> None:
        """``job``'s last token leaves ``rep``; the client sees it now, or (PS front end) once its ingress has streamed it."""
        turn = job.turn
        rep.release(job)
        rep.running -= 1
        rep.context_tokens -= turn.prompt_tokens + turn.output_tokens
        turn.replica = rep.rid
        if not ing_tok:
            to_client("last", turn, now)

    def seen_first(turn: Turn, now: float) -> None:
        """The client gets ``turn``'s first token (PS front end: after its ingress streamed it)."""
        turn.seen_first_at = now
        if not turn.first_token:
            turn.first_token = True
            if turn.rid >= measure_from:
                res.ttft_s.append(now - turn.sent_at + engine.request_overhead_s)

    def seen_last(turn: Turn, now: float) -> None:
        """The client gets ``turn``'s last token: the request is done for the ingress and the driver."""
        nonlocal outstanding
        if turn.output_tokens <= 1 and (ing_tok or cli_tok):
            seen_first(turn, now)
        turn.ingress.load.on_completed(turn.replica, str(turn.rid))
        outstanding -= 1
        driver.finish(turn, now, send)
        if turn.rid < measure_from:
            return
        if res.first_measured is None:
            res.first_measured = turn.sent_at
        res.e2e_s.append(now - turn.sent_at + engine.request_overhead_s)
        if turn.output_tokens > 1:
            start = turn.seen_first_at if ing_tok or cli_tok else turn.first_at
            res.tpot_s.append((now - start) / (turn.output_tokens - 1))
        res.output_tokens += turn.output_tokens
        res.completed += 1
        res.last_done = now

    def send(t: float, turn: Turn) -> None:
        nonlocal outstanding
        outstanding += 1
        res.sent += 1
        push(t, "send" if cli_req else "arrive", turn)

    def fail(rep: Replica, now: float) -> None:
        rep.alive = False
        if rep.rid in st.live:
            st.live.remove(rep.rid)
        for ing in ings:
            ing.policy.remove_replica(rep.rid)
            ing.load.remove_replica(rep.rid)
        if tier is not None:
            tier.drop_reporter(rep.rid)
        for turn in rep.take_all():
            turn.attempts += 1
            res.retries += 1
            push(now, "arrive", turn)
        res.failed_replicas += 1

    def autoscale(now: float) -> None:
        a = cluster.autoscale
        alive = [r for r in st.reps.values() if r.alive]
        ongoing = sum(r.ongoing for r in alive)
        want = min(a.max_replicas, max(a.min_replicas, math.ceil(ongoing / a.target_ongoing)))
        if want > len(alive):
            for _ in range(want - len(alive)):
                push(now + a.start_s, "ready", add_replica(now, ready=False))
                res.scale_ups += 1
        elif want < len(alive):
            for rep in [r for r in alive if r.ready and r.ongoing == 0][: len(alive) - want]:
                fail(rep, now)
                res.failed_replicas -= 1
                res.scale_downs += 1

    def gpu_count() -> int:
        return len({r.gpu for r in st.reps.values() if r.alive})

    outstanding = 0
    for _ in range(cluster.replicas):
        add_replica(0.0, ready=True)
    for t, idx in cluster.failures:
        push(t, "fail", idx)
    if cluster.autoscale is not None:
        push(cluster.autoscale.period_s, "scale", None)
    tick = driver.begin(send)
    if tick is not None:
        push(tick, "tick", None)
    now, last_t, gpus = 0.0, 0.0, gpu_count()
    while heap:
        now, _, kind, payload = heapq.heappop(heap)
        res.gpu_seconds += gpus * (now - last_t)
        last_t = now
        if kind == "stats":
            if payload.alive:
                st.stats[payload.rid] = report(payload, now)
                push(now + engine.stats_period_s, "stats", payload)
        elif kind == "arrive":
            arrive(payload, now)
        elif kind == "send":  # the client builds and sends it on its core, then the ingress has it
            client.add(now, (payload.rid, payload.attempts), engine.client_s_per_request, ("arrive", payload, payload.attempts))
            wake_client()
        elif kind == "client":
            if payload == client.version:
                client_due(now)
        elif kind == "to_client":
            what, turn, attempt = payload
            if attempt == turn.attempts:
                to_client(what, turn, now)
        elif kind == "route":
            route(payload, now)
        elif kind == "frontend":
            if payload[1] == payload[0].cpu.version:
                frontend(payload[0], now)
        elif kind == "enqueue":
            payload[0].entering -= 1
            enqueue(*payload, now)
        elif kind == "tick":
            tick = driver.tick(now, send)
            if tick is not None:
                push(tick, "tick", None)
        elif kind == "step":
            rep, chunks = payload
            if rep.alive:
                end_step(rep, chunks, now)
        elif kind == "wake":
            kick(payload, now)
        elif kind == "events":
            apply_events(*payload)
        elif kind == "fail":
            rep = st.reps.get(f"r{payload:04d}")
            if rep is not None and rep.alive:
                fail(rep, now)
        elif kind == "ready":
            if payload.alive:
                go_live(payload, now)
        elif kind == "scale" and (outstanding or tick is not None):
            autoscale(now)
            push(now + cluster.autoscale.period_s, "scale", None)
        gpus = gpu_count() if kind in ("fail", "ready", "scale") else gpus
        if outstanding == 0 and tick is None and kind in ("step", "tick", "frontend", "client"):
            break
    res.replicas_end = sum(1 for r in st.reps.values() if r.alive)
    res.gpus_end = gpus
    res.per_replica = {rid: r.served for rid, r in st.reps.items()}
    if cluster.measure_memory:
        res.index_bytes_per_ingress = deep_size(ings[0].policy)
    return res
