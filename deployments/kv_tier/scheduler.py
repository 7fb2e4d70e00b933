"""The scheduler side of the KV tier connector: lookups, what to load, what to store, events.

Owns: ``TierScheduler`` (one per engine core: directory lookups, per-request ``plan.ReqPlan``,
the step's ``messages.TierMeta``, delayed frees, BlockStored/BlockRemoved events). Bookkeeping is
delegated to ``plan.py`` and ``keys.py`` (pure).

Throughput cost of storing (first H100 run: no-reuse throughput 0.86x with the tier on). Every
prompt block of every request was copied GPU -> pinned -> plasma (2 MiB per 16 tokens for 8B: a
batch of 32 x 2K-token prompts is 8 GiB, of which the backlog let ~3.6 GiB through), and that
work (gather kernels, D2H, ~37 GB/s of ``ray.put`` memcpy threads, launches and GIL hand-offs in
the worker) ran alongside a CPU-bound eager engine. A copy whose blocks are already in the tier
is pure waste, and on a busy engine the rest is a bet on future reuse that the no-reuse workload
always loses. So (``plan.admit_stores``): blocks the lookup found present are skipped, and a step
that schedules more than ``store_busy_requests`` requests stores at most
``store_busy_mib_per_step`` (lowest blocks first: shared prefixes are at the start of prompts).
What a busy step cuts goes back to the request's ``next_store`` and is offered again by its later
steps (a running request keeps its prompt blocks), so a prompt reaches the tier in full under
sustained load, at most the budget per step (docs/kv_tier.md, section 3, has the run that showed a
busy engine storing only each request's first budget). Idle or lightly loaded steps still store
everything; single-request TTFT rounds are unaffected.

Directory epoch. The eviction poll (``_poll_evictions``, every ``_EVICTION_POLL_S``, the first on the
first step) also returns the directory's epoch; OBJ events carry the latest one known (medium
"OBJ@<epoch>", ``routers.events.obj_medium``), so routers drop what a restarted directory lost.
Stores between a restart and the next poll go out under the old epoch: routers then forget blocks
the tier does hold (a missed load, never a promised one that fails).

Load mode (``KVTierConfig.load_mode``). ``async``: a hit is returned as an async load, so the
request waits in WAITING_FOR_REMOTE_KVS while the worker copies its blocks and the steps of other
requests do not wait for it. ``sync``: the request is scheduled at once and the worker loads
inside that step. A preempted request that already stored blocks is not loaded asynchronously
again: vLLM would then wait for both a finished_sending and a finished_recving before freeing it
when aborted, and free it on the first.

Lookup latency. The lookup used to be sent when the scheduler first considered the request; on a
busy engine (no waiting) that always deferred a new request by one step, and on an idle one it
added a directory round trip to a hit's TTFT. ``on_new_request`` sends it on arrival instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
from vllm.distributed.kv_events import BlockRemoved, BlockStored
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from deployments.kv_tier.context import TierContext
from deployments.kv_tier.keys import FINGERPRINT_BYTES, block_keys
from deployments.kv_tier.messages import TierMeta, TierOp
from deployments.kv_tier.plan import ReqPlan, admit_stores, hit_run, loadable_blocks, skip_present, store_ranges
from deployments.kv_tier.shared import inc
from routers.events import obj_medium

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

_EVICTION_POLL_S = 2.0
_LOOKUP_WAIT_PER_STEP_S = 0.002  # total time the scheduler may wait for directory lookups per step


@dataclass(slots=True)
class _Lookup:
    fut: Any
    t0: float
    n_blocks: int
    start: int = 0
    present: list[bool] | None = None


class TierScheduler:
    """Scheduler-side state and hooks of ``RayObjectStoreConnector`` (see ``connector``)."""

    def __init__(self, ctx: TierContext) -> None:
        self._cfg, self._tags, self._owner, self._bs = ctx.cfg, ctx.tags, ctx.owner, ctx.bs
        self._enabled, self._fp_digest, self._tp = ctx.enabled, ctx.fp_digest, ctx.tp
        self._block_bytes, self._chunk_blocks, self._dir = ctx.block_bytes, ctx.chunk_blocks, ctx.dir
        self._plans: dict[str, ReqPlan] = {}
        self._reqs: dict[str, Request] = {}
        self._lookups: dict[str, _Lookup] = {}
        self._pending_loads: list[TierOp] = []
        self._events: list[Any] = []
        self._evict_fut = None
        self._evict_t = time.monotonic() - _EVICTION_POLL_S  # the first poll (and epoch) on the first step
        self._epoch: int | None = None  # the directory's, as of the last poll
        self._wait_budget_s = _LOOKUP_WAIT_PER_STEP_S
        self._load_async = ctx.cfg.load_mode == "async"

    def _hashes(self, request: Request) -> list[bytes]:
        return list(request.block_hashes)

    def _hash_granularity_ok(self, request: Request) -> bool:
        """vLLM hashes every ``hash_block_size`` tokens; the tier needs one hash per KV block."""
        return len(request.block_hashes) <= request.num_tokens // self._bs

    def _all_rank_keys(self, hashes: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for r in range(self._tp):
            out += block_keys(self._fp_digest, hashes, r)
        return out

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._enabled or not self._hash_granularity_ok(request):
            return 0, False
        n_load = min(loadable_blocks(request.num_tokens, self._bs), len(request.block_hashes))
        start = num_computed_tokens // self._bs
        min_load = self._cfg.min_load_blocks
        plan = self._plans.get(request.request_id)
        if self._load_async and plan is not None and plan.stored_any:
            # A preempted request resuming with stores behind it: its free already waits for
            # finished_sending, and vLLM would also wait for finished_recving if it were aborted
            # during the load (the second report would name a freed request). Recompute instead.
            return 0, False
        if n_load - start < min_load:
            self._lookups.pop(request.request_id, None)  # a prefetched lookup is moot (local hit)
            return 0, False
        lk = self._lookups.get(request.request_id)
        if lk is None or lk.n_blocks < n_load:
            lk = self._send_lookup(request, n_load)
        if lk.present is None:
            # A same-node directory answers in ~1 ms. On an idle engine wait for it a little
            # (bounded per step) rather than spin through an empty step; on a busy engine never
            # wait: the request simply joins the next step and the running batch is not slowed.
            t0 = time.monotonic()
            ready, _ = ray.wait([lk.fut], timeout=0 if self._plans else self._wait_budget_s)
            self._wait_budget_s = max(0.0, self._wait_budget_s - (time.monotonic() - t0))
            if ready:
                try:
                    flat = ray.get(lk.fut)
                except Exception as err:  # noqa: BLE001 - directory gone: a miss, not a failure
                    logger.warning("kv tier: lookup failed: %s", err)
                    flat = [False] * (lk.n_blocks * self._tp)
                n = lk.n_blocks
                lk.present = [all(flat[r * n + i] for r in range(self._tp)) for i in range(n)]
            elif time.monotonic() - lk.t0 > self._cfg.lookup_timeout_s:
                logger.warning("kv tier: directory lookup slower than %.2f s; treating it as a miss",
                               self._cfg.lookup_timeout_s)
                lk.present = []
            else:
                return None, False
        lk.start = start
        run = hit_run(lk.present, start, n_load)
        if run < min_load:
            return 0, False
        return run * self._bs, self._load_async

    def _send_lookup(self, request: Request, n_load: int) -> _Lookup:
        hashes = self._hashes(request)[:n_load]
        fut = self._dir.lookup.remote(self._all_rank_keys(hashes))
        lk = self._lookups[request.request_id] = _Lookup(fut, time.monotonic(), n_load)
        return lk

    def on_new_request(self, request: Request) -> None:
        """Send the directory lookup as the request arrives, so the answer (~1 ms) is usually in by
        the time the scheduler first asks: a busy engine never waits for lookups and would
        otherwise defer every new request by one step (returning None), and an idle one saves the
        round trip from a tier hit's TTFT."""
        try:
            if not self._enabled or not self._hash_granularity_ok(request):
                return
            n_load = min(loadable_blocks(request.num_tokens, self._bs), len(request.block_hashes))
            if n_load < self._cfg.min_load_blocks or request.request_id in self._lookups:
                return
            self._send_lookup(request, n_load)
        except Exception:  # a prefetch only: get_num_new_matched_tokens asks again
            logger.debug("kv tier: lookup prefetch failed", exc_info=True)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        if not self._enabled:
            return
        rid = request.request_id
        plan = self._plans.get(rid)
        if plan is None:
            plan = self._plans[rid] = ReqPlan(num_prompt_tokens=request.num_prompt_tokens)
            self._reqs[rid] = request
        lk = self._lookups.pop(rid, None)
        if lk is None:
            return
        hit = num_external_tokens // self._bs
        miss = max(0, lk.n_blocks - lk.start - hit)
        if lk.present:
            plan.present = lk.present  # blocks the tier already holds are not copied again
        plan.load_start, plan.load_blocks = lk.start, hit
        if hit:
            ids = blocks.get_block_ids()[0]
            hashes = self._hashes(request)
            self._pending_loads.append(TierOp(rid, list(ids[lk.start:lk.start + hit]),
                                              hashes[lk.start:lk.start + hit]))
            plan.next_store = max(plan.next_store, lk.start + hit)
            inc("kv_tier_hit_blocks", hit, self._tags)
            inc("kv_tier_hit_tokens", hit * self._bs, self._tags)
        if miss:
            inc("kv_tier_miss_blocks", miss, self._tags)
            inc("kv_tier_miss_tokens", miss * self._bs, self._tags)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> TierMeta:
        meta = TierMeta()
        self._wait_budget_s = _LOOKUP_WAIT_PER_STEP_S
        if not self._enabled:
            return meta
        meta.loads, self._pending_loads = self._pending_loads, []
        meta.preempted = set(scheduler_output.preempted_req_ids or ())
        n_sched = scheduler_output.num_scheduled_tokens
        cands: list[tuple[str, int, int]] = []
        for new in scheduler_output.scheduled_new_reqs:
            plan = self._plans.get(new.req_id)
            if plan is None:
                continue
            plan.block_ids = list(new.block_ids[0])
            # Local hit + loaded blocks are not stored again; after a failed load this is the
            # valid prefix only, so the recomputed blocks are stored anew.
            plan.next_store = new.num_computed_tokens // self._bs
            if plan.next_store < plan.load_start + plan.load_blocks:
                plan.present = []  # the load failed (chunks lost): the snapshot is wrong, store anew
            cands += self._plan_stores(new.req_id, plan, new.num_computed_tokens + n_sched.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            plan = self._plans.get(rid)
            if plan is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                plan.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                plan.block_ids.extend(new_ids[0])
            cands += self._plan_stores(rid, plan, cached.num_computed_tokens[i] + n_sched.get(rid, 0))
        if cands:
            busy_reqs = self._cfg.store_busy_requests
            busy = busy_reqs > 0 and len(n_sched) > busy_reqs
            budget = int(self._cfg.store_busy_mib_per_step * 1024**2) // self._block_bytes
            admitted, resume = admit_stores(cands, busy, budget)
            for rid, block in resume.items():
                plan = self._plans[rid]
                plan.next_store = min(plan.next_store, block)  # offered again by its next step
            for rid, lo, hi in admitted:
                self._emit_store(rid, lo, hi, meta)
        return meta

    def _plan_stores(self, rid: str, plan: ReqPlan, computed: int) -> list[tuple[str, int, int]]:
        """Candidate store ranges ``(rid, lo, hi)`` of blocks that became full this step."""
        if plan.num_prompt_tokens // self._bs < self._cfg.min_store_blocks:
            return []
        if not self._hash_granularity_ok(self._reqs[rid]):
            return []
        ranges, plan.next_store = store_ranges(plan.next_store, computed, plan.num_prompt_tokens,
                                               self._bs, self._chunk_blocks)
        if not ranges:
            return []
        n_hashes = len(self._reqs[rid].block_hashes)
        out = []
        for lo, hi in ranges:
            hi = min(hi, len(plan.block_ids), n_hashes)
            lo = skip_present(lo, hi, plan.present)
            if hi > lo:
                out.append((rid, lo, hi))
        return out

    def _emit_store(self, rid: str, lo: int, hi: int, meta: TierMeta) -> None:
        plan, request = self._plans[rid], self._reqs[rid]
        hashes = self._hashes(request)
        meta.stores.append(TierOp(rid, plan.block_ids[lo:hi], hashes[lo:hi]))
        plan.stored_any = True
        if self._cfg.emit_kv_events:
            self._events.append(self._stored_event(request, hashes, lo, hi))

    def _stored_event(self, request: Request, hashes: list[bytes], lo: int, hi: int) -> BlockStored:
        lora = getattr(request, "lora_request", None)
        return BlockStored(
            block_hashes=[maybe_convert_block_hash(h) for h in hashes[lo:hi]],
            parent_block_hash=maybe_convert_block_hash(hashes[lo - 1]) if lo else None,
            token_ids=list(request.all_token_ids[lo * self._bs:hi * self._bs]),
            block_size=self._bs, lora_id=None, medium=obj_medium(self._epoch),
            lora_name=lora.lora_name if lora is not None else None,
        )

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if not self._enabled:
            return False, None
        rid = request.request_id
        self._lookups.pop(rid, None)
        self._reqs.pop(rid, None)
        plan = self._plans.pop(rid, None)
        return (plan is not None and plan.stored_any), None

    def take_events(self):
        if not self._enabled:
            return ()
        self._poll_evictions()
        events, self._events = self._events, []
        return events

    def _poll_evictions(self) -> None:
        """Turn the directory's evictions of our chunks into BlockRemoved(medium=OBJ) events; learn its epoch."""
        if not self._cfg.emit_kv_events:
            return
        if self._evict_fut is not None:
            ready, _ = ray.wait([self._evict_fut], timeout=0)
            if not ready:
                return
            try:
                epoch, keys = ray.get(self._evict_fut)
            except Exception:  # noqa: BLE001 - events are best effort
                epoch, keys = self._epoch, []
            self._evict_fut = None
            if epoch != self._epoch:
                if self._epoch is not None:
                    logger.info("kv tier: the directory restarted (epoch %d -> %d)", self._epoch, epoch)
                self._epoch = epoch
            head = self._fp_digest + (0).to_bytes(2, "big")
            hashes = [k[FINGERPRINT_BYTES + 2:] for k in keys if k.startswith(head)]
            if hashes:
                self._events.append(BlockRemoved(block_hashes=[maybe_convert_block_hash(h) for h in hashes],
                                                 medium=obj_medium(self._epoch)))
        if time.monotonic() - self._evict_t >= _EVICTION_POLL_S:
            self._evict_t = time.monotonic()
            self._evict_fut = self._dir.poll_evicted.remote(self._owner)
