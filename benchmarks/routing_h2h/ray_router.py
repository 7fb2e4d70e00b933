"""Ray Serve LLM's ``PrefixCacheAffinityRouter``, fed kvserve's replica requests, with its costs on the ingress timed.

Owns ``RayPrefixCacheAffinity``: Ray's router unchanged (its prefix tree actor, thresholds and
power-of-two fallback) except for where it reads the prompt. Ray's version reads ``prompt`` or
``messages`` text from the request; kvserve's ingress sends token ids (``GenerateRequest``), so here
each token id becomes one character (offset past the surrogate range). Two prompts then share a
character prefix exactly when they share a token prefix, which is the signal Ray's tree uses; its
character-based thresholds count tokens instead. Select it with
``routing.request_router_class: benchmarks.routing_h2h.ray_router:RayPrefixCacheAffinity``.

Its steps are timed into the metrics the head-to-head's evidence reads, so Ray's cells show where the ingress waits
for its router: kvserve's own ``route_wait_ms`` (the handle call to the decision, as ``KVServeRouter`` records it) and
``router_decision_latency_us`` (Ray's ``choose_replicas``), and ``kvserve_router_ray_call_milliseconds`` by ``call``:
``match`` (its prefix match, with any queue-length probe it awaits and the synchronous ``ray.get`` to its tree
actor), ``probe`` (a queue-length probe of replicas not in its cache) and ``insert`` (``on_request_routed``: the
synchronous ``ray.get`` that inserts the prompt, on the ingress's event loop once the replica took the request) and
``routed`` (the time from the decision to that insert: Serve's send and the replica's reply, during which the tree
does not yet hold the prompt).

With ``request_router_kwargs: {trace_dir: DIR}`` each decision is also written, one JSON line per decision, to
``DIR/ray-router-<pid>.jsonl`` (``routing_h2h.run --ray-trace``): when, the prompt's length, the candidates Ray's
``choose_replicas`` returned (its first rank: the longest-match holders or the smallest tenants), Serve's cached
queue length of each, the replica taken, and how many requests were still waiting for a routing task.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter

from deployments.metrics import STAGE_MS_BUCKETS, metrics

logger = logging.getLogger(__name__)
_OFFSET = 0x10000  # past the UTF-16 surrogates; chr() accepts ids up to 0x10FFFF - _OFFSET
STRATEGY = "ray-prefix-cache-affinity"  # the ``strategy`` tag of its decision latency


def tokens_as_text(token_ids: list[int]) -> str:
    """One character per token id."""
    return "".join(chr(_OFFSET + t) for t in token_ids)


@functools.cache
def call_ms():
    """This process's histogram of the router's steps (ms), tagged ``call``."""
    from ray.util.metrics import Histogram

    return Histogram("kvserve_router_ray_call_milliseconds",
                     description="Ray's PrefixCacheAffinityRouter on the ingress, per step (benchmarks/routing_h2h/"
                     "ray_router.py): match, probe, insert, routed.", boundaries=STAGE_MS_BUCKETS, tag_keys=("call",))


class RayPrefixCacheAffinity(PrefixCacheAffinityRouter):
    """Ray's prefix-cache affinity router over token ids, its steps timed (and traced with ``trace_dir``)."""

    def initialize_state(self, trace_dir: str | None = None, **kwargs) -> None:
        super().initialize_state(**kwargs)
        self._trace = Path(trace_dir) / f"ray-router-{os.getpid()}.jsonl" if trace_dir else None
        self._awaiting: dict[int, tuple] = {}  # id(first rank) -> (request, ranks) until Serve selects from it
        if self._trace is not None:
            self._trace.parent.mkdir(parents=True, exist_ok=True)

    def _record(self, pending_request, ranks, replica) -> None:
        """One decision as a JSON line (``trace_dir`` only); never raises into Serve's routing."""
        try:
            gen = pending_request.args[0] if pending_request is not None and pending_request.args else None
            first = [r.replica_id.unique_id for r in (ranks[0] if ranks else [])]
            line = {"t": round(time.time(), 4), "prompt_tokens": len(getattr(gen, "prompt_token_ids", None) or ()),
                    "candidates": first,
                    "queue": {r.replica_id.unique_id: self._replica_queue_len_cache.get(r.replica_id)
                              for r in self._replicas_list},
                    "chosen": replica.replica_id.unique_id if replica is not None else None,
                    "waiting": len(self._pending_requests_to_route)}
            with self._trace.open("a") as f:
                f.write(json.dumps(line) + "\n")
        except Exception:  # a trace must not fail a request
            logger.warning("ray_router: could not trace a decision", exc_info=True)

    def _extract_text_from_request(self, pending_request) -> str:
        gen = pending_request.args[0] if pending_request.args else None
        ids = getattr(gen, "prompt_token_ids", None)
        if ids is None:
            return super()._extract_text_from_request(pending_request)
        return tokens_as_text(ids)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        t0 = time.perf_counter()
        chosen = await super().choose_replicas(candidate_replicas, pending_request)
        if pending_request is not None:
            decided = self.__dict__.setdefault("_decided_at", {})  # id(request) -> decision time, until routed
            if len(decided) > 1000:
                decided.clear()
            decided[id(pending_request)] = time.perf_counter()
            m = metrics()
            gen = pending_request.args[0] if pending_request.args else None
            m.route_wait_ms.observe(max(time.time() - pending_request.created_at, 0.0) * 1000,
                                    tags={"model": str(getattr(gen, "model_id", ""))})
            m.router_decision_latency_us.observe((time.perf_counter() - t0) * 1e6, tags={"strategy": STRATEGY})
            if getattr(self, "_trace", None) is not None and chosen and chosen[0]:
                # the replica taken is known once Serve selects from this very list (routing tasks interleave)
                if len(self._awaiting) > 1000:
                    self._awaiting.clear()
                self._awaiting[id(chosen[0])] = (pending_request, chosen)
        return chosen

    async def _select_from_candidate_replicas(self, candidates, backoff_index):
        replica = await super()._select_from_candidate_replicas(candidates, backoff_index)
        if getattr(self, "_trace", None) is not None and (seen := self._awaiting.pop(id(candidates), None)):
            self._record(seen[0], seen[1], replica)
        return replica

    async def _prefix_match_best_replicas(self, pending_request, candidate_replicas):
        t0 = time.perf_counter()
        try:
            return await super()._prefix_match_best_replicas(pending_request, candidate_replicas)
        finally:
            call_ms().observe((time.perf_counter() - t0) * 1000, tags={"call": "match"})

    async def _probe_queue_lens(self, replicas, backoff_index):
        t0 = time.perf_counter()
        try:
            return await super()._probe_queue_lens(replicas, backoff_index)
        finally:
            if replicas:
                call_ms().observe((time.perf_counter() - t0) * 1000, tags={"call": "probe"})

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        t0 = time.perf_counter()
        if (decided := self.__dict__.get("_decided_at", {}).pop(id(pending_request), None)) is not None:
            call_ms().observe((t0 - decided) * 1000, tags={"call": "routed"})
        try:
            super().on_request_routed(pending_request, replica_id, result)
        finally:
            call_ms().observe((time.perf_counter() - t0) * 1000, tags={"call": "insert"})
