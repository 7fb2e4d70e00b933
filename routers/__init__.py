"""Pure routing logic shared by the ingress, the KV tier and the simulator (no ray/fastapi/vllm).

Public API: ``block_hashes`` (vLLM-identical prompt block hashes), ``make_policy``/``Knobs``/
``Policy`` (decisions), ``ApproxIndex``/``PreciseIndex`` (who holds which blocks), ``LoadTracker``
(per-replica load estimates) and the seam
types in ``routers.types``.
"""

from routers.approx_index import ApproxIndex
from routers.hashing import BlockHasher, block_hashes
from routers.load import LoadTracker
from routers.policy import REASONS, STRATEGIES, Knobs, Policy, make_policy
from routers.precise_index import PreciseIndex
from routers.types import Decision, ReplicaSnapshot, ReplicaStats, RoutingRequest

__all__ = [
    "REASONS",
    "STRATEGIES",
    "ApproxIndex",
    "BlockHasher",
    "Decision",
    "Knobs",
    "LoadTracker",
    "Policy",
    "PreciseIndex",
    "ReplicaSnapshot",
    "ReplicaStats",
    "RoutingRequest",
    "block_hashes",
    "make_policy",
]
