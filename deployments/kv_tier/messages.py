"""What the KV tier's scheduler side tells its workers each step (the connector metadata).

Owns: ``TierOp`` and ``TierMeta``. Built by ``scheduler.TierScheduler.build_connector_meta``, read
by ``worker.TierWorker``; vLLM carries it from the scheduler process to the workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


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
