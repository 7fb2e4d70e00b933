"""The KV tier's directory as a Ray actor: where it runs, how it survives, what it reports.

Owns: ``DirectoryActor`` (``directory.BlockDirectory`` as a detached named actor that records the
directory-side metrics), ``get_directory`` (create or find it) and ``head_node_id``. The directory lives on
the head node and Ray restarts it when its process dies; see ``get_directory``.
"""

from __future__ import annotations

import logging
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from deployments.kv_tier.directory import BlockDirectory, LoadLog, LoadRecord

logger = logging.getLogger(__name__)


class DirectoryActor(BlockDirectory):
    """The directory as a detached named actor; records the tier's directory-side metrics.

    Ray runs ``__init__`` again on every restart, so each incarnation gets a new ``epoch`` (its start
    time in ms: larger after a restart, unless the clock steps back by more than the restart took)."""

    def __init__(self, budget_bytes: int, model: str) -> None:
        super().__init__(budget_bytes, epoch=time.time_ns() // 1_000_000)
        logger.info("kv tier: directory started empty, epoch %d", self.epoch)
        self._tags = {"model": model}
        self._reported = dict(self.counters)
        self._loads = LoadLog(keep=256)
        self._host_dma: list[dict] = []

    def add_chunk_ref(self, owner: str, keys: list[bytes], refs: list, nbytes: int) -> bool:
        """``add_chunk`` with the ref wrapped in a list (so Ray passes it unresolved)."""
        ok = self.add_chunk(owner, keys, refs[0], nbytes)
        self._report()
        return ok

    def note_load(self, rec: LoadRecord) -> None:
        """A worker's report of one finished load (kept for benchmarks; metrics are worker-side)."""
        self._loads.add(rec)

    def note_host_dma(self, replica: str, nbytes: int, seconds: float) -> None:
        """A worker's report of page-locking its object-store mappings (kept for benchmarks)."""
        self._host_dma.append({"replica": replica, "bytes": int(nbytes), "seconds": round(float(seconds), 3)})
        del self._host_dma[:-64]

    def host_dma(self) -> list[dict]:
        """The workers' ``note_host_dma`` reports, oldest first."""
        return list(self._host_dma)

    def recent_loads(self) -> list[dict]:
        """The last 256 loads (``LoadRecord`` fields: bytes, milliseconds in all and per phase, failed blocks,
        direct and into-pages chunks), oldest first."""
        return [r.as_dict() for r in self._loads.recent()]

    def stats(self) -> dict:
        """``BlockDirectory.stats`` and, under ``loads``, ``LoadLog.summary`` (every load's phases)."""
        return {**super().stats(), "loads": self._loads.summary()}

    def node_id(self) -> str:
        """The Ray node this directory runs on."""
        return ray.get_runtime_context().get_node_id()

    def drop_keys(self, keys: list[bytes]) -> int:
        n = super().drop_keys(keys)
        self._report()
        return n

    def drop_owner(self, owner: str) -> int:
        n = super().drop_owner(owner)
        logger.info("kv tier: dropped %d blocks of dead owner %s", n, owner)
        self._report()
        return n

    def _report(self) -> None:
        try:
            from deployments.metrics import metrics

            m = metrics()
            for name, metric in (("blocks_evicted", m.kv_tier_evicted_blocks),
                                 ("blocks_lost", m.kv_tier_lost_blocks)):
                delta = self.counters[name] - self._reported[name]
                if delta:
                    metric.inc(delta, tags=self._tags)
            m.kv_tier_directory_bytes.set(self.bytes_used, tags=self._tags)
            self._reported = dict(self.counters)
        except Exception:
            logger.debug("kv tier: metrics failed", exc_info=True)


#: The resource Ray gives the head node alone (it appears in ``ray.nodes()``' resources of that node only).
HEAD_NODE_RESOURCE = "node:__internal_head__"


def head_node_id(nodes: list[dict]) -> str | None:
    """The id of the alive head node in ``ray.nodes()``' answer, or None (e.g. not visible to this process)."""
    for n in nodes:
        if n.get("Alive") and HEAD_NODE_RESOURCE in (n.get("Resources") or {}):
            return n["NodeID"]
    return None


def get_directory(name: str, namespace: str, budget_bytes: int, store_fraction: float, model: str):
    """The cluster's directory actor (created detached on first use).

    The budget is capped at ``store_fraction`` of the smallest node's object store, so the tier
    alone can never fill a store (no spilling, no ObjectStoreFullError).

    The actor lives on the head node (a soft node affinity: GPU worker nodes come and go with the
    autoscaler, the head stays) and Ray restarts it whenever its process dies (``max_restarts=-1``). A
    restarted directory starts empty: its refs died with it, every lookup misses until engines store
    again, and the handles engines already hold reach the new instance (a call that meets the restart
    fails, which the connector counts as a miss). The new instance has a new ``epoch``, which engines
    learn at their next eviction poll and put in their OBJ events, so routers drop the old blocks.
    """
    nodes = ray.nodes()
    caps = [n["Resources"].get("object_store_memory", 0) for n in nodes if n.get("Alive")]
    cap = int(store_fraction * min(c for c in caps if c > 0)) if any(caps) else budget_bytes
    budget = max(1, min(int(budget_bytes), cap))
    head = head_node_id(nodes)
    strategy = NodeAffinitySchedulingStrategy(node_id=head, soft=True) if head else "DEFAULT"
    actor = ray.remote(DirectoryActor).options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_concurrency=1, max_restarts=-1, scheduling_strategy=strategy,
    ).remote(budget, model)
    return actor
