"""Each replica's scheduler: vLLM's step loop over the replica's waiting and running requests.

Owns ``Scheduler``, the part of a run (``sim.Cluster``) from a request reaching a replica's scheduler
to its last token leaving it (state in ``replica.Replica``, costs in ``engine.EngineModel``). Each step
decodes one token for every running request and gives the rest of the ``chunk_tokens`` budget to
prefill chunks, oldest waiting request first. A request's reused prefix is looked up when the
scheduler first reaches it (GPU blocks, then tier blocks, loaded at ``tier_gbps`` plus a fixed
``tier_hit_s`` before its first chunk); its blocks are cached (and, with the tier, written to it)
when its prefill completes, which is its first token. With ``kv_admission`` a waiting request is
scheduled only once free + evictable blocks cover its new KV blocks (``Replica.admit``; the replica's
cache and the blocks running requests hold are one pool), in queue order: the head waits, as vLLM's
scheduler stops at the first request it cannot allocate. With ``async_scheduling`` a request that
arrives while a step runs waits out one more step (``Job.not_before``) unless the replica would
otherwise idle. Its prefix is matched once it is admitted
(its reused blocks are then held and cannot be evicted under it), and the unreferenced cached blocks
its admission displaces are evicted oldest first (BlockRemoved events).
"""

from __future__ import annotations

from benchmarks.simulator.load import Turn
from benchmarks.simulator.replica import Job, Replica
from routers.events import BlockRemoved, BlockStored


def gpu_events(stored: list[int], removed: list[int]) -> list:
    """The KV events of a replica's cache change: its stored blocks, then those it evicted (none for an empty list)."""
    return (([BlockStored(tuple(stored), "GPU")] if stored else [])
            + ([BlockRemoved(tuple(removed), "GPU")] if removed else []))


class Scheduler:
    """Mixin of ``sim.Cluster``: enqueue, look up, step, first token, complete."""

    def enqueue(self, rep: Replica, turn: Turn, now: float) -> None:
        """``turn`` reaches ``rep``'s scheduler; one sent to a replica that died meanwhile is sent again."""
        if not rep.alive:
            turn.attempts += 1
            self.res.retries += 1
            self.push(now, "arrive", turn)
            return
        job = Job(turn, enqueued_at=now)
        if self.engine.async_scheduling and rep.stepping:
            job.not_before = rep.steps + 3  # step steps+1 runs and steps+2 was formed before it came
        rep.waiting.append(job)
        self.kick(rep, now)

    def lookup(self, rep: Replica, job: Job, now: float) -> None:
        """The scheduler first sees ``job``: reuse the GPU prefix, then what the tier holds after it."""
        tier, bs, res = self.tier, self.bs, self.res
        hashes, prompt = job.turn.block_hashes, job.turn.prompt_tokens
        gpu = rep.gpu_prefix(hashes)
        extra = tier.prefix(hashes, gpu) if tier is not None else 0
        job.cached = min(gpu * bs, max(prompt - 1, 0))
        job.from_tier = max(0, min((gpu + extra) * bs, max(prompt - 1, 0)) - job.cached)
        rep.touch(hashes[:gpu])
        if job.from_tier:
            tier.touch(hashes[gpu: gpu + extra])
            job.ready_at = now + self.engine.tier_ready_s(job.from_tier)
        job.remaining = prompt - job.cached - job.from_tier
        job.looked_up = True
        if job.turn.rid < self.measure_from:
            return
        res.prompt_tokens += prompt
        res.cached_tokens += job.cached
        res.tier_tokens += job.from_tier

    def kick(self, rep: Replica, now: float) -> None:
        if rep.stepping or not rep.alive:
            return
        engine = self.engine
        budget = engine.chunk_tokens - rep.running
        chunks, prefill_s, wake = [], 0.0, None
        for job in rep.waiting:
            if budget <= 0:
                break
            if job.not_before > rep.steps + 1 and (chunks or rep.running):
                break  # not in the engine core's queue when this step was formed; nor is any job behind it
            if engine.kv_admission and not job.admitted:
                if not rep.admit(job, engine.kv_blocks, self.bs):
                    break  # vLLM schedules its waiting queue in order: the head waits for blocks
                evicted = rep.evict_unreferenced()
                if evicted:
                    self.emit(rep, [BlockRemoved(tuple(evicted), "GPU")], now)
            if not job.looked_up:  # with admission: once its blocks are held, as vLLM matches at scheduling
                self.lookup(rep, job, now)
            if job.ready_at > now:
                wake = job.ready_at if wake is None else min(wake, job.ready_at)
                continue
            take = min(budget, job.remaining)
            if job.started_at is None:
                job.started_at = now
            done_before = job.turn.prompt_tokens - job.cached - job.from_tier - job.remaining
            prefill_s += engine.prefill_chunk_s(take, job.cached + job.from_tier + done_before)
            chunks.append((job, take))
            budget -= take
        if not chunks and rep.running == 0:
            if wake is not None:
                self.push(wake, "wake", rep)
            return
        rep.stepping, rep.prefilling = True, bool(chunks)
        dur = engine.step_time_s(rep.running, rep.context_tokens, prefill_s, *self.peers(rep),
                                 prefill_tokens=sum(take for _, take in chunks))
        self.res.busy_s += dur
        self.push(now + dur, "step", (rep, chunks))

    def end_step(self, rep: Replica, chunks: list, now: float) -> None:
        rep.stepping = rep.prefilling = False
        rep.steps += 1
        k = rep.steps
        self.stream(rep, rep.running, now)
        for turn in rep.second.pop(k, ()):
            self.second_token(turn, now)
        rep.context_tokens += rep.running
        for job in rep.finishing.pop(k, ()):
            self.complete(rep, job, now)
        for job, take in chunks:
            job.remaining -= take
            if job.remaining == 0:
                rep.waiting.remove(job)
                self.first_token(rep, job, k, now)
        self.kick(rep, now)

    def first_token(self, rep: Replica, job: Job, k: int, now: float) -> None:
        turn, engine, tier = job.turn, self.engine, self.tier
        if self.loop:
            turn.first_at = now
            turn.pacer.due(now, turn.output_tokens <= 1)  # a stream's first chunk always goes out
            self.chunk(turn, "last" if turn.output_tokens <= 1 else "first", now)
        elif self.ing_tok:
            turn.first_at = now
            last = turn.output_tokens <= 1
            turn.ingress.cpu.add(now, (turn.rid, turn.attempts), engine.frontend_s_per_token,
                                 ("last" if last else "first", turn, turn.attempts))
            self.wake(turn.ingress)
        elif self.cli_tok:  # the client reads it once the ingress's FIFO (if costly) has passed it on
            turn.first_at = now
            seen = turn.ingress.fifo.work(now, engine.frontend_s_per_token) if engine.frontend_s_per_token > 0 else now
            self.push(seen, "to_client", ("first", turn, turn.attempts))
        elif not turn.first_token:
            turn.first_at = now
            costly = engine.frontend_s_per_token > 0 and turn.rid >= self.measure_from
            self.seen_first(turn, turn.ingress.fifo.work(now, engine.frontend_s_per_token) if costly else now)
        if turn.text_from == 2 and not self.loop:  # text_from is 1 for a single output token
            rep.second.setdefault(k + 1, []).append(turn)
        if turn.rid >= self.measure_from and turn.attempts == 0:
            self.res.engine_ttft_s.append(now - turn.routed_at)  # kvserve's engine stage: the replica's whole part
            self.res.engine_input_s.append(job.enqueued_at - turn.routed_at)
            self.res.engine_wait_s.append(job.started_at - job.enqueued_at)
            self.res.engine_prefill_s.append(now - job.started_at)
        rep.meter.first_output(now, turn.prompt_tokens - job.cached, turn.routed_at)
        stored, removed = rep.insert(turn.block_hashes)
        self.emit(rep, gpu_events(stored, removed), now)
        if tier is not None:
            put, evicted = tier.put(turn.block_hashes, rep.rid)
            if put:
                self.emit(rep, [BlockStored(tuple(put), "OBJ")], now)
            for who, hs in evicted.items():
                if who in self.st.reps:
                    self.emit(self.st.reps[who], [BlockRemoved(tuple(hs), "OBJ")], now)
        rep.running += 1
        rep.context_tokens += turn.prompt_tokens + 1
        if turn.output_tokens <= 1:
            self.complete(rep, job, now)
        else:
            rep.finishing.setdefault(k + turn.output_tokens - 1, []).append(job)

    def complete(self, rep: Replica, job: Job, now: float) -> None:
        """``job``'s last token leaves ``rep``; the client sees it now, or (PS front end) once its ingress has
        streamed it."""
        turn = job.turn
        # the answer's blocks join this replica's cache (and its KV events), not the tier's (it stores prompts)
        stored = rep.cache(turn.output_hashes)
        rep.release(job)
        if stored:
            self.emit(rep, gpu_events(stored, rep.evict_unreferenced()), now)
        rep.running -= 1
        rep.context_tokens -= turn.prompt_tokens + turn.output_tokens
        turn.replica = rep.rid
        if not (self.ing_tok or self.loop):
            self.to_client("last", turn, now)
