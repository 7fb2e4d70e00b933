"""The simulated cluster's replicas as the ingresses see them: added, live, reporting, failed, scaled.

Owns ``Fleet``, the part of a run (``sim.Cluster``) that starts replicas (ready now, or cold after
``Autoscale.start_s``), sends each live replica's periodic report (``stats_period_s``) to every
ingress's ``LoadTracker``, delivers KV events to every ingress's policy (``event_lag_s`` late), and
kills replicas (failure or scale-down): their requests are re-sent through the ingresses, their
tier objects die with them. Replicas sharing a GPU (``replicas_per_gpu``) slow each other while both
step, and their prefill chunks slow each other more (``peers``).
"""

from __future__ import annotations

import math
import time

from benchmarks.simulator.replica import Replica


class Fleet:
    """Mixin of ``sim.Cluster``: the replica lifecycle (state in ``self.st``, ingresses in ``self.ings``)."""

    def add_replica(self, now: float, ready: bool) -> Replica:
        st, engine = self.st, self.engine
        idx = len(st.reps)
        rep = Replica(f"r{idx:04d}", idx // engine.replicas_per_gpu, engine.kv_blocks, ready=ready)
        st.reps[rep.rid] = rep
        st.gpus.setdefault(rep.gpu, []).append(rep)
        st.stats[rep.rid] = {}
        if ready:
            self.go_live(rep, now)
        return rep

    def go_live(self, rep: Replica, now: float) -> None:
        rep.ready = True
        self.st.live.append(rep.rid)
        for ing in self.ings:
            if ing.precise is not None:
                ing.precise.mark_live(rep.rid)
        self.push(now, "stats", rep)

    def peers(self, rep: Replica) -> tuple[int, int]:
        """The other live replicas on ``rep``'s GPU stepping now, and those of them whose step carries prefill."""
        stepping = prefilling = 0
        for p in self.st.gpus[rep.gpu]:
            if p is not rep and p.alive and p.stepping:
                stepping += 1
                prefilling += p.prefilling
        return stepping, prefilling

    def report(self, rep: Replica, now: float) -> dict:
        engine, bs = self.engine, self.bs
        queued = sum(j.remaining if j.looked_up else j.turn.prompt_tokens - rep.gpu_prefix(j.turn.block_hashes) * bs
                     for j in rep.waiting)
        return {"block_size": bs, "num_gpu_blocks": engine.kv_blocks, "num_running": rep.running,
                "num_waiting": len(rep.waiting), "queued_prefill_tokens": int(queued),
                "prefill_tokens_per_s": (rep.meter.rate if self.cluster.rate_report == "measured"
                                         else engine.prefill_tokens_per_s),
                "timestamp": now,
                "kv_usage": len(rep.lru) / engine.kv_blocks}

    def emit(self, rep: Replica, events: list, now: float) -> None:
        if not self.precise or not events:
            return
        if self.cluster.event_lag_s > 0:
            self.push(now + self.cluster.event_lag_s, "events", (rep, events))
        else:
            self.apply_events(rep, events)

    def apply_events(self, rep: Replica, events: list) -> None:
        if not rep.alive:
            return
        t0 = time.perf_counter()
        for ing in self.ings:
            for ev in events:
                ing.policy.on_event(rep.rid, ev)
        self.res.event_apply_s += time.perf_counter() - t0
        self.res.events_applied += len(events) * len(self.ings)

    def fail(self, rep: Replica, now: float) -> None:
        rep.alive = False
        if rep.rid in self.st.live:
            self.st.live.remove(rep.rid)
        for ing in self.ings:
            ing.policy.remove_replica(rep.rid)
            ing.load.remove_replica(rep.rid)
        if self.tier is not None:
            self.tier.drop_reporter(rep.rid)
        for turn in rep.take_all():
            turn.attempts += 1
            self.res.retries += 1
            self.push(now, "arrive", turn)
        self.res.failed_replicas += 1

    def autoscale(self, now: float) -> None:
        a, res = self.cluster.autoscale, self.res
        alive = [r for r in self.st.reps.values() if r.alive]
        ongoing = sum(r.ongoing for r in alive)
        want = min(a.max_replicas, max(a.min_replicas, math.ceil(ongoing / a.target_ongoing)))
        if want > len(alive):
            for _ in range(want - len(alive)):
                self.push(now + a.start_s, "ready", self.add_replica(now, ready=False))
                res.scale_ups += 1
        elif want < len(alive):
            for rep in [r for r in alive if r.ready and r.ongoing == 0][: len(alive) - want]:
                self.fail(rep, now)
                res.failed_replicas -= 1
                res.scale_downs += 1

    def gpu_count(self) -> int:
        return len({r.gpu for r in self.st.reps.values() if r.alive})
