"""Ray Serve LLM's ``PrefixCacheAffinityRouter`` as a simulator policy: a twin of its decisions, not Ray's code.

Owns ``RAY_TWIN`` (the strategy name, the GPU head-to-head's system name), ``RayTree`` and
``RayPrefixAffinity``. The head-to-head runs Ray's router on token ids, one character per token
(``benchmarks/routing_h2h/ray_router.py``), so its character counts are token counts and a match on
the prompt's chained block hashes is a match on its characters to within a block. Ray 2.60's
defaults, as its ``prefix_aware_router.py`` and ``prefix_tree.py`` decide:

1. ``imbalanced_threshold`` is infinite: the power-of-two fallback on queue imbalance never triggers.
2. The prompt is matched against one tree per deployment (``RayTree``: Ray's ``PrefixTreeActor``,
   shared by every ingress replica's router). match rate = the longest leading run of the prompt's
   blocks that a replica's tenant holds, in tokens, over the prompt's tokens.
3. rate >= ``match_rate_threshold`` (0.1): the candidates are the tenants with that longest match;
   otherwise the "smallest tenants", those with the fewest tokens in the tree (over the whole tree,
   as Ray's ``get_smallest_tenants``).
4. Serve takes the candidate with the shortest queue below ``max_ongoing`` in its queue-length cache, the
   first of equal ones (its ``_select_from_candidate_replicas`` keeps the first lowest; the candidates here in
   replica order). The cache is Serve's, one per ingress: +1 when it sends a request (``on_send_request``),
   the replica's own count of ongoing requests when its reply to a send comes back (``on_new_queue_len_info``:
   every ingress's requests, where the ingress's own estimate counts its own), -1 when a request it sent
   completes (``decrement_queue_len_cache``); a replica it has no entry for counts what the ingress has there
   (Ray probes it).
5. The routed prompt is inserted into the chosen replica's tenant (``on_request_routed``): every
   block it lacked and the partial block at the end, counted in tokens, once the replica's reply to the
   send is back (``accepted``: ``EngineModel.ray_reply_s`` after the replica has taken the request), so
   the decisions made meanwhile see the tree without it. New prompts decided in that window all go to the same
   smallest tenant (usually one), and their sessions then stay there (their later turns match it longest):
   a wave of sessions that start together lands on one replica. Nothing is ever evicted
   (``do_eviction`` is off by default) and KV events are not read: the tree believes a replica
   holds whatever was ever routed there.

The tree outlives a benchmark cell, as the deployment's tree actor does: the GPU run serves its cells in turn on
one deployment, so a cell starts from the tenants its run's earlier cells left (``routing_cells.simulate_cell``
passes one ``RayTree`` through them), and a workload's new sessions first go to the tenant the previous workload
left smallest.

The synchronous ``ray.get`` calls to the tree actor (the match, the insert) hold the ingress's event loop for
``EngineModel.tree_call_s`` (+ per 1K tokens) each (``path.py``); 0 unless measured (``calibrate --tree-cost``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from benchmarks.simulator.replica import leading
from routers.policy import Knobs, Policy
from routers.types import Decision, ReplicaSnapshot, RoutingRequest

RAY_TWIN = "ray-prefix-cache-affinity"
MATCH_RATE_THRESHOLD = 0.1


def ray_knobs(base: Knobs) -> Knobs:
    """``base`` (any strategy's knobs: the twin reads none of its routing knobs) named as the twin."""
    return dataclasses.replace(base, strategy=RAY_TWIN)


class RayTree:
    """Ray's prefix tree of one deployment, per replica (tenant): the blocks routed there and its size in tokens."""

    def __init__(self) -> None:
        self.blocks: dict[str, set[int]] = {}
        self.tokens: dict[str, int] = {}

    def add(self, rid: str) -> None:
        self.blocks.setdefault(rid, set())
        self.tokens.setdefault(rid, 0)

    def remove(self, rid: str) -> None:
        self.blocks.pop(rid, None)
        self.tokens.pop(rid, None)

    def match(self, hashes: Sequence[int], rid: str) -> int:
        """Leading blocks of ``hashes`` that ``rid``'s tenant holds."""
        return leading(self.blocks.get(rid, ()), hashes)

    def insert(self, rid: str, hashes: Sequence[int], prompt_tokens: int, block_size: int) -> None:
        """``rid`` was sent the prompt: its new blocks and its partial tail count to the tenant's size."""
        self.add(rid)
        held = self.blocks[rid]
        new = sum(1 for h in hashes if h not in held)
        held.update(hashes)
        self.tokens[rid] += new * block_size + max(prompt_tokens - len(hashes) * block_size, 0)

    def smallest(self) -> list[str]:
        if not self.tokens:
            return []
        low = min(self.tokens.values())
        return [r for r, n in self.tokens.items() if n == low]


class RayPrefixAffinity(Policy):
    """The twin's decision (module docstring); ``tree`` is shared by every ingress of the run."""

    name = RAY_TWIN

    def __init__(self, knobs: Knobs, tree: RayTree) -> None:
        super().__init__(knobs)
        self.tree = tree
        self.queue: dict[str, int] = {}  # Serve's queue-length cache of this ingress (4.)

    def choose(self, request: RoutingRequest, snapshots: Sequence[ReplicaSnapshot], now, rng) -> Decision:
        if not snapshots:
            raise ValueError("no candidate replicas")
        by_id = {s.replica_id: s for s in snapshots}
        for rid in by_id:
            self.tree.add(rid)  # Ray adds a tenant per replica as its router learns of it (update_replicas)
        bs = snapshots[0].block_size
        matched = {rid: self.tree.match(request.block_hashes, rid) for rid in by_id}
        best = max(matched.values(), default=0)
        rate = best * bs / max(request.num_prompt_tokens, 1)
        if rate >= MATCH_RATE_THRESHOLD:
            group, reason = [r for r, n in matched.items() if n == best], "cache-hit"
        else:
            group, reason = [r for r in self.tree.smallest() if r in by_id], "no-cache"
        queue = {r: self.queue.get(r, by_id[r].running) for r in by_id}
        open_ = [r for r in group if queue[r] < by_id[r].max_ongoing] or group or list(by_id)
        low = min(queue[r] for r in open_)
        rid = min(r for r in open_ if queue[r] == low)
        self.queue[rid] = queue[rid] + 1  # the send
        reuse = min(matched[rid] * bs, max(request.num_prompt_tokens - 1, 0))
        return Decision(rid, reason, reuse)

    def accepted(self, request: RoutingRequest, replica_id: str, block_size: int, ongoing: int) -> None:
        """``replica_id``'s reply to the send of ``request``: it holds ``ongoing`` requests (this one among them), and
        Ray's ``on_request_routed`` inserts the prompt into the tree."""
        if replica_id in self.tree.tokens:  # not a replica removed meanwhile
            self.queue[replica_id] = ongoing
            self.tree.insert(replica_id, request.block_hashes, request.num_prompt_tokens, block_size)

    def completed(self, replica_id: str) -> None:
        """A request this ingress sent to ``replica_id`` is done."""
        if replica_id in self.queue:
            self.queue[replica_id] = max(self.queue[replica_id] - 1, 0)

    def remove_replica(self, replica_id: str) -> None:
        super().remove_replica(replica_id)
        self.tree.remove(replica_id)
        self.queue.pop(replica_id, None)
