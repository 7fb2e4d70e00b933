"""The worker side of the KV tier connector: runs the loads and stores the scheduler side planned.

Owns: ``TierWorker`` (one per worker process: the ``Storer`` and ``Loader`` over this worker's
paged cache, and what it reports back through ``get_finished`` and
``get_block_ids_with_load_errors``). Reads ``messages.TierMeta``; the connector hands it each
step's metadata.

Loads (``KVTierConfig.load_mode``). ``async``: ``start_load_kv`` only submits them, so the step and
every other request's decode go on while the copies run; a request is returned in
``finished_recving`` once all its copies have completed (vLLM keeps it in WAITING_FOR_REMOTE_KVS
until then, and holds the blocks of one aborted meanwhile until that report; every load is
reported, failed or not, each TP rank for itself). ``sync``: ``start_load_kv`` waits for the
step's loads before the forward pass and nothing is reported as received. In both, the blocks of
a failed chunk go to ``get_block_ids_with_load_errors`` and vLLM recomputes them.
"""

from __future__ import annotations

import logging
from typing import Any

from deployments.kv_tier.context import TierContext
from deployments.kv_tier.keys import block_keys
from deployments.kv_tier.load import Loader
from deployments.kv_tier.messages import TierMeta
from deployments.kv_tier.pages import KVPages
from deployments.kv_tier.store import Storer

logger = logging.getLogger(__name__)


class TierWorker:
    """Worker-side state and hooks of ``RayObjectStoreConnector`` (see ``connector``)."""

    def __init__(self, ctx: TierContext) -> None:
        self._cfg, self._tags, self._owner = ctx.cfg, ctx.tags, ctx.owner
        self._enabled, self._fp, self._fp_digest, self._tp = ctx.enabled, ctx.fp, ctx.fp_digest, ctx.tp
        self._chunk_blocks, self._dir = ctx.chunk_blocks, ctx.dir
        self._storer: Storer | None = None
        self._loader: Loader | None = None
        self._bad: set[int] = set()
        self._unstored: set[str] = set()  # store ops this worker could not run (release anyway)
        self._unloaded: set[str] = set()  # load ops this worker could not run (fail -> recompute)
        self._rank = 0
        self._load_async = ctx.cfg.load_mode == "async"

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
                              self._tags, host_dma=cfg.host_dma, parallel_loads=cfg.parallel_loads)

    def _keys(self, hashes: list[bytes]) -> list[bytes]:
        return block_keys(self._fp_digest, hashes, self._rank)

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        """Preempted requests' blocks are freed without request_finished: finish or cancel their
        pending copies before this step's forward can overwrite those blocks."""
        meta = kv_connector_metadata
        if self._storer is not None and isinstance(meta, TierMeta) and meta.preempted:
            self._storer.cancel(meta.preempted)

    def start_load_kv(self, meta: Any) -> None:
        """Submit this step's loads (``meta``: the step's connector metadata).

        ``async``: return at once; each request is reported by ``get_finished`` when all its copies
        have completed. ``sync``: wait here, before the forward pass that reads the blocks."""
        assert isinstance(meta, TierMeta), "unexpected connector metadata"
        futs = []
        for op in meta.loads:
            if self._loader is not None:
                futs.append(self._loader.submit(op.req_id, op.block_ids, self._keys(op.block_hashes)))
            else:  # disabled here: report the load as failed so vLLM recomputes
                if self._load_async:
                    self._unloaded.add(op.req_id)
                self._bad.update(op.block_ids)
        if futs and not self._load_async:
            for fut in futs:
                fut.result()  # the loader's copies have completed (streams synchronized) when it returns
            _, bad = self._loader.take_finished()  # sync requests are running: no finished_recving
            self._bad |= bad

    def wait_for_save(self, meta: Any) -> None:
        """Submit this step's stores (after the forward that computed their blocks)."""
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
            if self._load_async:
                loaded, bad = self._loader.take_finished()
                recvd |= loaded
                self._bad |= bad
        return (sent or None), (recvd or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        if not self._bad:
            return set()
        bad, self._bad = self._bad, set()
        return bad
