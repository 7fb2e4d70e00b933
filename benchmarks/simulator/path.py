"""The request path outside the engines: the load generator's core, the ingress replicas, routing and
the tokens streamed back.

Owns ``Ingress`` (one ingress replica: its own policy, ``routers.load.LoadTracker`` and RNG, exactly as
``deployments/request_router.py`` wires them, and its CPU) and ``RequestPath``, the part of a run
(``sim.Cluster``) between the client and a replica's front end. Requests are spread over ingresses
by the load balancer in front (``EngineModel.ingress_balance``: round-robin, or HAProxy's leastconn on the streams
each ingress has open). Each ingress's CPU (``frontend.py``, costs in ``engine.py``)
delays the route, the first token and, with processor sharing or the event loop ("loop": a request's hops
and every chunk are callbacks in arrival order), the client's completion. The load
generator's own cores (``engine.client_s_per_*``, ``client_cores`` of them, one per bench process, processor-sharing or
serving callbacks in order: ``engine.client_sharing``) build each
request before the ingress sees it and reads every streamed token: the client's TTFT is its first
token with text read (``Turn.text_from``), and a closed-loop worker sends its next request once it has read the
last. A request sent again (its replica failed) keeps its first send time; work queued for the dead stream is
dropped.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from benchmarks.simulator.frontend import FifoServer, LoopServer, PSServer, QueueServer
from benchmarks.simulator.load import Turn
from benchmarks.simulator.replica import Replica
from deployments.pacing import LoopLag, StreamPacer
from routers.load import LoadTracker
from routers.types import RoutingRequest


@dataclass(eq=False)
class Ingress:
    policy: object
    load: LoadTracker
    rng: random.Random
    precise: object | None = None
    fifo: FifoServer = field(default_factory=FifoServer)  # its CPU, frontend_sharing "fifo"
    cpu: PSServer = field(default_factory=PSServer)  # its CPU, frontend_sharing "ps"
    loop: LoopServer = field(default_factory=LoopServer)  # its event loop, frontend_sharing "loop"
    merging: bool = False  # "loop": the streams it routes now ask for merged chunks
    streams: int = 0  # requests it has taken whose last token it has not streamed yet (leastconn's count)


class RequestPath:
    """Mixin of ``sim.Cluster``: client -> ingress -> replica's front end, and tokens back to the client."""

    def send(self, t: float, turn: Turn) -> None:
        turn.text_from = self.engine.text_from(turn.rid, turn.text, turn.output_tokens)
        self.outstanding += 1
        self.res.sent += 1
        self.push(t, "send" if self.cli_req else "arrive", turn)

    def arrive(self, turn: Turn, now: float) -> None:
        engine = self.engine
        if turn.streaming:  # sent again (its replica failed): that stream is gone
            turn.ingress.streams -= 1
        ing = self.balance(turn)
        ing.streams += 1
        turn.ingress, turn.streaming = ing, True
        work = engine.prepare_s(turn.prompt_tokens, text=turn.text, hashed=self.hashing)
        if self.loop:  # each hop is a callback behind what the loop has queued meanwhile
            per = work / engine.frontend_hops
            self.push(ing.loop.work(now, per), "hop", (turn, turn.attempts, engine.frontend_hops - 1, per))
        elif work <= 0:
            self.route(turn, now)
        elif self.ps:
            ing.cpu.add(now, (turn.rid, turn.attempts), work, ("route", turn, turn.attempts))
            self.wake(ing)
        else:
            self.push(ing.fifo.work(now, work), "route", turn)

    def balance(self, turn: Turn) -> Ingress:
        """The ingress the load balancer gives ``turn``: by its number (round-robin), or (leastconn) the one with the
        fewest streams open, the first of those after the last one picked."""
        n = len(self.ings)
        if self.engine.ingress_balance == "round-robin" or n == 1:
            return self.ings[(turn.rid + turn.attempts) % n]
        least = min(ing.streams for ing in self.ings)
        self.balanced = next(i for k in range(1, n + 1) if self.ings[i := (self.balanced + k) % n].streams == least)
        return self.ings[self.balanced]

    def hop(self, turn: Turn, attempt: int, left: int, per: float, now: float) -> None:
        """One of ``turn``'s callbacks on its ingress's loop ran ("loop"): queue the next, or route it."""
        if attempt != turn.attempts:
            return
        if left == 0:
            self.route(turn, now)
        else:
            self.push(turn.ingress.loop.work(now, per), "hop", (turn, attempt, left - 1, per))

    def chunk(self, turn: Turn, what: str | None, now: float) -> None:
        """A chunk of ``turn``'s stream leaves its replica ("loop"): a callback on its ingress's loop; the first and
        the last reach the client once it has run."""
        done = turn.ingress.loop.work(now, self.engine.frontend_s_per_token)
        if what is not None:
            self.push(done, "to_client", (what, turn, turn.attempts))

    def wake(self, ing: Ingress) -> None:
        """Schedule ``ing``'s processor-sharing CPU to hand back its next mark (earlier wake-ups go stale)."""
        t = ing.cpu.next_time()
        ing.cpu.version += 1
        if t is not None:
            self.push(t, "frontend", (ing, ing.cpu.version))

    def frontend(self, ing: Ingress, now: float) -> None:
        for what, turn, attempt in ing.cpu.due(now):
            if attempt != turn.attempts:
                continue  # sent again meanwhile (its replica failed): that stream is gone
            if what == "route":
                self.route(turn, now)
            else:
                self.to_client(what, turn, now)
        self.wake(ing)

    def to_client(self, what: str, turn: Turn, now: float) -> None:
        """The ingress streamed ``turn``'s first or last token: the client reads it (its core, if costly)."""
        if what == "last" and turn.streaming:  # its stream ends: the load balancer counts it no more
            turn.ingress.streams -= 1
            turn.streaming = False
        if not self.cli_tok:
            self.seen(what, turn, now)
            return
        core = self.client_of(turn)
        core.add(now, (turn.rid, turn.attempts), self.engine.client_s_per_token, (what, turn, turn.attempts))
        self.wake_client(core)

    def client_of(self, turn: Turn) -> PSServer | QueueServer:
        """The client core (bench process) that sends ``turn`` and reads its tokens: its part's (``SplitDriver``), else
        one by request number. A part's workers sharing one processor-sharing core finish sends started together at
        once, so on engines of equal steps (the fake-engine cells) they stay in step; a core serving its callbacks in
        order (``client_sharing`` "fifo"), as a bench process's event loop does, sends them one after the other."""
        return self.clients[(turn.part if turn.part >= 0 else turn.rid) % len(self.clients)]

    def wake_client(self, core: PSServer | QueueServer) -> None:
        t = core.next_time()
        core.version += 1
        if t is not None:
            self.push(t, "client", (core, core.version))

    def client_due(self, core: PSServer | QueueServer, now: float) -> None:
        for what, turn, attempt in core.due(now):
            if attempt != turn.attempts:
                continue
            if what == "arrive":
                self.arrive(turn, now)
            else:
                self.seen(what, turn, now)
        self.wake_client(core)

    def stream(self, rep: Replica, tokens: int, now: float) -> None:
        """``tokens`` output tokens leave ``rep`` (one per running request): the replica's front end streams them
        (``replica_s_per_token``), then frontend work. FIFO: spread over the ingresses; PS: each on its request's
        stream, the last one marked; loop: a chunk per stream on its ingress's loop (``stream_loop``)."""
        if not tokens:
            return
        engine, ing_tok, cli_tok = self.engine, self.ing_tok, self.cli_tok
        if engine.replica_s_per_token > 0:  # the replica's loop streams them: later inputs wait behind it
            rep.input_until = max(now, rep.input_until) + engine.replica_s_per_token * tokens
        if self.loop:
            self.stream_loop(rep, now)
            return
        if engine.frontend_s_per_token > 0 and not self.ps:
            per = engine.frontend_s_per_token * tokens / len(self.ings)
            for ing in self.ings:
                ing.fifo.work(now, per)
        if not (ing_tok or cli_tok):
            return
        k, touched, cores = rep.steps, {}, {}  # insertion-ordered: sets would wake them in memory-address order
        for step, jobs in rep.finishing.items():
            for job in jobs:
                turn, key = job.turn, (job.turn.rid, job.turn.attempts)
                if ing_tok:
                    turn.ingress.cpu.add(now, key, engine.frontend_s_per_token,
                                         ("last", turn, turn.attempts) if step == k else None)
                    touched[turn.ingress] = None
                if cli_tok and step != k:  # the last token reaches the client through to_client
                    core = self.client_of(turn)
                    core.add(now, key, engine.client_s_per_token)
                    cores[core] = None
        for ing in touched:
            self.wake(ing)
        for core in cores:
            self.wake_client(core)

    def stream_loop(self, rep: Replica, now: float) -> None:
        """Frontend "loop": each stream's token of this step is a chunk (a merging stream's only once its interval
        has passed, its last always); the client reads every token."""
        k, cli_tok, cores = rep.steps, self.cli_tok, {}
        for step, jobs in rep.finishing.items():
            for job in jobs:
                turn = job.turn
                if step == k:
                    turn.pacer.due(now, True)
                    self.chunk(turn, "last", now)
                    continue
                if turn.pacer.due(now, False):
                    text = turn.text_from == 2 and not turn.second_at  # its first chunk had no text: this one has
                    if text:
                        turn.second_at = now
                    self.chunk(turn, "text" if text else None, now)
                if cli_tok:
                    core = self.client_of(turn)
                    core.add(now, (turn.rid, turn.attempts), self.engine.client_s_per_token)
                    cores[core] = None
        for core in cores:
            self.wake_client(core)

    def route(self, turn: Turn, now: float) -> None:
        """``turn``'s work before routing is done: decide, once the loop is no longer held by its inline tokenising (a
        chat prompt, ``tokenize_hold_s``) and Ray's twin's tree match."""
        hold = self.engine.tree_call_hold_s(turn.prompt_tokens) if self.tree_calls else 0.0
        if turn.text:
            hold += self.engine.tokenize_hold_s
        if hold > 0:
            self.push(self.hold(turn.ingress, now, hold), "decide", (turn, turn.attempts))
        else:
            self.decide(turn, now)

    def hold(self, ing: Ingress, now: float, seconds: float) -> float:
        """A blocking call holds ``ing``'s loop for ``seconds`` behind what it has queued; returns when it ends."""
        if self.loop:
            return ing.loop.hold(now, seconds)
        if self.ps:
            end = ing.cpu.hold(now, seconds)
            self.wake(ing)
            return end
        return ing.fifo.work(now, seconds)

    def decide(self, turn: Turn, now: float) -> None:
        ing, engine, res, st = turn.ingress, self.engine, self.res, self.st
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
        turn.routed_at = now
        if self.loop:  # kvserve's ingress decides at dispatch, with LoopLag's hysteresis; the replica paces
            if engine.frontend_merge_busy > 0:
                share = ing.loop.busy_share(now)
                ing.merging = share > engine.frontend_merge_busy * (LoopLag.BUSY_OFF if ing.merging else 1)
            # the interval less a nanosecond: simulated steps of exact lengths land on it to within rounding
            turn.pacer = StreamPacer(self.replica_loop, engine.frontend_merge_interval_s - 1e-9, merge=ing.merging)
        front = engine.input_s(turn.prompt_tokens)
        queued = front > 0 or rep.input_until > now  # its own input work, or streaming queued before it
        taken = max(now, rep.input_until) + front if queued else now  # when the replica has taken it
        if self.tree_calls:  # Ray's twin learns the prompt and the replica's count at Serve's reply (ray_twin.py)
            self.push(taken + engine.ray_reply_s, "accepted", (ing, rr, d.replica_id, snap.block_size))
        if queued:
            rep.input_until = taken
            rep.entering += 1
            self.push(taken, "enqueue", (rep, turn))
        else:
            self.enqueue(rep, turn, now)

    def accepted(self, ing: Ingress, request: RoutingRequest, replica_id: str, block_size: int, now: float) -> None:
        """Ray's twin has Serve's reply: the replica's count, and the prompt inserted into its tree by a synchronous
        call that holds the ingress's loop."""
        rep = self.st.reps.get(replica_id)
        ing.policy.accepted(request, replica_id, block_size, rep.ongoing if rep is not None else 0)
        if (hold := self.engine.tree_call_hold_s(request.num_prompt_tokens)) > 0:
            self.hold(ing, now, hold)

    def seen(self, what: str, turn: Turn, now: float) -> None:
        """The client reads a chunk of ``turn`` the ingress streamed: its ``first`` token, its first with ``text``
        (the loop's second chunk when the first had none), or its ``last``."""
        {"first": self.seen_first, "text": self.seen_text, "last": self.seen_last}[what](turn, now)

    def seen_first(self, turn: Turn, now: float) -> None:
        """The client gets ``turn``'s first token (PS front end: after its ingress streamed it): its TTFT, unless that
        token has no text (``text_from`` 2: then its second token's, ``second_token``; the loop streams that one)."""
        turn.seen_first_at = now
        if not turn.first_token:
            turn.first_token = True
            if turn.text_from == 1:
                self.seen_text(turn, now)
            elif turn.second_at and not self.loop:
                self.seen_text(turn, now + turn.second_at - turn.first_at)

    def second_token(self, turn: Turn, now: float) -> None:
        """``turn``'s second token leaves its engine and its first had no text (not the loop front end, which streams
        it): the client sees it as long after its first as the engine made it after its first."""
        turn.second_at = now
        if turn.first_token:
            self.seen_text(turn, turn.seen_first_at + now - turn.first_at)

    def seen_text(self, turn: Turn, now: float) -> None:
        """The client gets ``turn``'s first token with text: its TTFT, once."""
        if not turn.text_seen:
            turn.text_seen = True
            turn.ttft_s = now - turn.sent_at + self.engine.request_overhead_s
            if turn.rid >= self.measure_from:
                self.res.ttft_s.append(turn.ttft_s)

    def seen_last(self, turn: Turn, now: float) -> None:
        """The client gets ``turn``'s last token: the request is done for the ingress and the driver."""
        res, via_cores = self.res, self.ing_tok or self.cli_tok or self.loop
        if turn.output_tokens <= 1 and via_cores:
            self.seen_first(turn, now)
        self.seen_text(turn, now)  # at the latest with its last token
        turn.ingress.load.on_completed(turn.replica, str(turn.rid))
        if self.tree_calls:  # Serve's queue-length cache of Ray's twin
            turn.ingress.policy.completed(turn.replica)
        self.outstanding -= 1
        self.driver.finish(turn, now, self.send)
        if turn.rid < self.measure_from:
            return
        if res.first_measured is None:
            res.first_measured = turn.sent_at
        res.e2e_s.append(now - turn.sent_at + self.engine.request_overhead_s)
        if res.requests is not None:  # shaped as kvserve bench's per-request rows (routing_h2h.beside reads both)
            res.requests.append({"replica": turn.replica, "start_s": turn.sent_at, "ttft_s": turn.ttft_s,
                                 "e2e_s": res.e2e_s[-1], "output_tokens": turn.output_tokens, "ok": True})
        if turn.output_tokens > 1:
            start = turn.seen_first_at if via_cores else turn.first_at
            res.tpot_s.append((now - start) / (turn.output_tokens - 1))
        res.output_tokens += turn.output_tokens
        res.completed += 1
        res.last_done = now
