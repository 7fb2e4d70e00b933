"""The vLLM adapter of the KV tier: ``RayObjectStoreConnector``, a ``KVConnectorBase_V1``.

Owns: the one module that touches vLLM's connector API (targets vLLM 0.26-0.27; no version
sniffing: only hooks that exist in both are used). Bookkeeping is delegated to ``plan.py`` and
``keys.py`` (pure), tensor and object-store I/O to ``pages.py``, ``store.py`` and ``load.py`` (with
``host_memory.py`` and ``shared.py``), the directory actor to ``directory_actor.py``.

Why a KVConnectorBase_V1 and not an OffloadingConnector spec. The native OffloadingConnector
+ TieringOffloadingSpec would make Ray a *secondary* tier behind a pinned /dev/shm L1 managed in
the scheduler process: every hit goes plasma -> L1 -> GPU (one extra host copy), L1 costs a
second copy of the cache's worth of host memory per replica, and its lookup/store API
(OffloadKey, JobResult, HIT_PENDING) changed between 0.26 and 0.27. Ray's object store already
*is* a shared-memory host tier, so a direct connector (modelled on SimpleCPUOffloadConnector:
async loads, stores off the critical path, delayed frees) does one host copy each way, keeps all
version-sensitive code in this file, and can still be chained after vLLM's CPU offload with
``MultiConnector`` if an L1 is wanted later.

Flow (one engine; ``S`` = scheduler side in EngineCore, ``W`` = each worker)::

    S on_new_request: block keys -> directory.lookup (async, sent as the request arrives)
    S get_num_new_matched_tokens: that lookup's answer (None = not in yet, ask next step)
      -> longest present run beyond the local hit -> (run*B, async=True)
    S update_state_after_alloc: remember (block ids, hashes) of the run -> load op
    S build_connector_meta: load ops + store ops for prompt blocks that became full this step
      (minus blocks the tier already held; a busy step admits only a small budget)
    W start_load_kv: Loader threads fetch chunks, copy into the blocks -> get_finished(recving)
    W wait_for_save: Storer copies the new blocks out (side stream), thread ray.put + register
    S request_finished: hold the blocks (True) until W reports the copies done (finished_sending)
    W get_block_ids_with_load_errors: blocks of lost/evicted chunks -> vLLM recomputes them

Configuration arrives in ``kv_connector_extra_config`` (``KVTierConfig.model_dump()`` + the model id,
built by ``kv_tier_engine_kwargs``) and is validated back into a ``KVTierConfig`` once, in
``__init__`` (``tier_config_from_extra``); its defaults are the only ones.

Throughput cost of storing (first H100 run: no-reuse throughput 0.86x with the tier on). Every
prompt block of every request was copied GPU -> pinned -> plasma (2 MiB per 16 tokens for 8B: a
batch of 32 x 2K-token prompts is 8 GiB, of which the backlog let ~3.6 GiB through), and that
work (gather kernels, D2H, ~37 GB/s of ``ray.put`` memcpy threads, launches and GIL hand-offs in
the worker) ran alongside a CPU-bound eager engine. A copy whose blocks are already in the tier
is pure waste, and on a busy engine the rest is a bet on future reuse that the no-reuse workload
always loses. So (``plan.admit_stores``): blocks the lookup found present are skipped, and a step
that schedules more than ``store_busy_requests`` requests stores at most
``store_busy_mib_per_step`` (lowest blocks first: shared prefixes are at the start of prompts; a
request cut short stops storing, as later blocks would be unreachable without the earlier ones).
Idle or lightly loaded steps still store everything, and one store per prefix cluster-wide is
enough, so hot prefixes still reach the tier. Expected: the no-reuse batch stores ~4 x 32 MiB
instead of ~3.6 GiB, i.e. ratio ~0.98-1.0; single-request TTFT rounds are unaffected.

Lookup latency. The lookup used to be sent when the scheduler first considered the request; on a
busy engine (no waiting) that always deferred a new request by one step, and on an idle one it
added a directory round trip to a hit's TTFT. ``on_new_request`` sends it on arrival instead.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from vllm.distributed.kv_events import BlockRemoved, BlockStored
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from deployments.kv_tier import directory_actor
from deployments.kv_tier.engine_args import tier_config_from_extra
from deployments.kv_tier.keys import FINGERPRINT_BYTES, Fingerprint, block_keys
from deployments.kv_tier.load import Loader
from deployments.kv_tier.pages import KVPages
from deployments.kv_tier.plan import ReqPlan, admit_stores, hit_run, loadable_blocks, skip_present, store_ranges
from deployments.kv_tier.shared import ensure_ray, inc
from deployments.kv_tier.store import Storer

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

_EVICTION_POLL_S = 2.0
_LOOKUP_WAIT_PER_STEP_S = 0.002  # total time the scheduler may wait for directory lookups per step


@dataclass(slots=True)
class TierOp:
    """Copy these blocks (ids in the paged cache) to/from the tier; hashes name them."""

    req_id: str
    block_ids: list[int]
    block_hashes: list[bytes]


@dataclass
class TierMeta(KVConnectorMetadata):
    """What the scheduler side tells the workers for one step."""

    loads: list[TierOp] = field(default_factory=list)
    stores: list[TierOp] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)  # their blocks may be reused this step


@dataclass(slots=True)
class _Lookup:
    fut: Any
    t0: float
    n_blocks: int
    start: int = 0
    present: list[bool] | None = None


def fingerprint_of(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, model_id: str) -> Fingerprint:
    """The key fingerprint of this engine (same on its scheduler and all its workers)."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    group = kv_cache_config.kv_cache_groups[0]
    spec = group.kv_cache_spec
    kv_dtype = str(spec.dtype) if cc.cache_dtype == "auto" else str(cc.cache_dtype)
    return Fingerprint(
        model=model_id, revision=mc.revision, kv_dtype=kv_dtype, block_size=cc.block_size,
        hash_algo=str(cc.prefix_caching_hash_algo), hash_seed=os.environ.get("PYTHONHASHSEED"),
        tp_size=pc.tensor_parallel_size * pc.pipeline_parallel_size,
        num_layers=len(group.layer_names), page_bytes=int(spec.page_size_bytes),
        layout=f"{type(spec).__name__}:{getattr(spec, 'num_kv_heads', '')}x{getattr(spec, 'head_size', '')}",
    )


class RayObjectStoreConnector(KVConnectorBase_V1):
    """Shared prefix-KV tier in Ray's object store (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config, role, kv_cache_config)
        cfg, model_id = tier_config_from_extra(self._kv_transfer_config.kv_connector_extra_config)
        self._cfg = cfg
        self._bs = vllm_config.cache_config.block_size
        self._model = model_id or vllm_config.model_config.served_model_name or "model"
        if isinstance(self._model, list):
            self._model = self._model[0]
        self._tags = {"model": str(self._model)}
        self._owner = str(self._kv_transfer_config.engine_id)
        # scheduler-side state
        self._plans: dict[str, ReqPlan] = {}
        self._reqs: dict[str, Request] = {}
        self._lookups: dict[str, _Lookup] = {}
        self._pending_loads: list[TierOp] = []
        self._events: list[Any] = []
        self._evict_fut = None
        self._evict_t = time.monotonic()
        self._wait_budget_s = _LOOKUP_WAIT_PER_STEP_S
        # worker-side state
        self._storer: Storer | None = None
        self._loader: Loader | None = None
        self._bad: set[int] = set()
        self._unstored: set[str] = set()  # store ops this worker could not run (release anyway)
        self._unloaded: set[str] = set()  # load ops this worker could not run (fail -> recompute)
        self._rank = 0
        self._enabled = len(kv_cache_config.kv_cache_groups) == 1
        if not self._enabled:
            logger.warning("kv tier: disabled (%d KV cache groups; only uniform models are supported)",
                           len(kv_cache_config.kv_cache_groups))
            return
        self._fp = fingerprint_of(vllm_config, kv_cache_config, str(self._model))
        self._fp_digest = self._fp.digest()
        self._tp = self._fp.tp_size
        if self._fp.hash_seed is None:
            logger.warning("kv tier: PYTHONHASHSEED is unset, so block hashes differ per process and "
                           "replicas cannot share blocks; set it identically on every replica")
        block_bytes = self._block_bytes = self._fp.num_layers * self._fp.page_bytes
        self._chunk_blocks = max(1, int(cfg.chunk_mib * 1024**2) // max(1, block_bytes))
        try:
            ensure_ray(cfg.ray_address, cfg.namespace)
            self._dir = directory_actor.get_directory(
                cfg.directory_name, cfg.namespace, cfg.budget_bytes, cfg.max_object_store_fraction,
                str(self._model),
            )
        except Exception:
            logger.exception("kv tier: disabled: cannot reach the Ray cluster / directory")
            self._enabled = False
            return
        logger.info("kv tier: role=%s model=%s fingerprint=%s chunk=%d blocks (%d B/block)",
                    role.name, self._model, self._fp_digest.hex(), self._chunk_blocks, block_bytes)

    # ==== worker side =========================================================================
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        if not self._enabled:
            return
        try:
            pages = KVPages(kv_caches)
        except ValueError as err:
            logger.warning("kv tier: disabled: %s", err)
            self._enabled = False
            return
        if pages.page_bytes != self._fp.page_bytes or pages.num_layers != self._fp.num_layers:
            logger.warning("kv tier: disabled: cache pages %dx%d B differ from the spec %dx%d B",
                           pages.num_layers, pages.page_bytes, self._fp.num_layers, self._fp.page_bytes)
            self._enabled = False
            return
        if self._tp > 1:
            from vllm.distributed.parallel_state import get_pp_group, get_tp_group

            self._rank = get_pp_group().rank_in_group * get_tp_group().world_size + get_tp_group().rank_in_group
        cfg = self._cfg
        backlog = int(cfg.store_backlog_mib * 1024**2) // pages.block_bytes()
        self._storer = Storer(pages, self._dir, self._owner, self._chunk_blocks, cfg.store_slots,
                              cfg.store_threads, max(self._chunk_blocks, backlog), self._tags)
        self._loader = Loader(pages, self._dir, self._chunk_blocks, cfg.load_threads, cfg.load_timeout_s,
                              self._tags, register_host_memory=cfg.register_host_memory)

    def _keys(self, hashes: list[bytes]) -> list[bytes]:
        return block_keys(self._fp_digest, hashes, self._rank)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped store is a future miss

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Preempted requests' blocks are freed without request_finished: finish or cancel their
        pending copies before this step's forward can overwrite those blocks."""
        meta = kv_connector_metadata
        if self._storer is not None and isinstance(meta, TierMeta) and meta.preempted:
            self._storer.cancel(meta.preempted)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierMeta), "unexpected connector metadata"
        for op in meta.loads:
            if self._loader is not None:
                self._loader.submit(op.req_id, op.block_ids, self._keys(op.block_hashes))
            else:  # disabled here: report the load as failed so vLLM recomputes
                self._unloaded.add(op.req_id)
                self._bad.update(op.block_ids)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        for op in meta.stores:
            if self._storer is not None:
                self._storer.submit(op.req_id, op.block_ids, self._keys(op.block_hashes))
            else:  # disabled here: still release the blocks the scheduler holds for us
                self._unstored.add(op.req_id)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sent = self._unstored & finished_req_ids
        self._unstored -= sent
        recvd, self._unloaded = self._unloaded, set()
        if self._storer is not None:
            sent |= self._storer.finished(finished_req_ids)
            loaded, bad = self._loader.take_finished()
            recvd |= loaded
            self._bad |= bad
        return (sent or None), (recvd or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        if not self._bad:
            return set()
        bad, self._bad = self._bad, set()
        return bad

    # ==== scheduler side ======================================================================
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
        return run * self._bs, True

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

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
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
            admitted, cut = admit_stores(cands, busy, budget)
            for rid in cut:
                self._plans[rid].store_stopped = True
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
        if not ranges or plan.store_stopped:
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
            block_size=self._bs, lora_id=None, medium="OBJ",
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
        """Turn the directory's evictions of our chunks into BlockRemoved(medium=OBJ) events."""
        if not self._cfg.emit_kv_events:
            return
        if self._evict_fut is not None:
            ready, _ = ray.wait([self._evict_fut], timeout=0)
            if not ready:
                return
            try:
                keys = ray.get(self._evict_fut)
            except Exception:  # noqa: BLE001 - events are best effort
                keys = []
            self._evict_fut = None
            head = self._fp_digest + (0).to_bytes(2, "big")
            hashes = [k[FINGERPRINT_BYTES + 2:] for k in keys if k.startswith(head)]
            if hashes:
                self._events.append(BlockRemoved(block_hashes=[maybe_convert_block_hash(h) for h in hashes],
                                                 medium="OBJ"))
        if time.monotonic() - self._evict_t > _EVICTION_POLL_S:
            self._evict_t = time.monotonic()
            self._evict_fut = self._dir.take_evicted.remote(self._owner)
