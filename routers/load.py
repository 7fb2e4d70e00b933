"""The router's view of each replica's load: last report merged with its own in-flight accounting.

Owns: ``LoadTracker``. Replicas report ``ReplicaStats`` every stats period (1 s by default), which
is stale under bursts; the router also knows exactly what it sent. Per replica it keeps:

    outstanding:  request id -> uncached prompt tokens, for requests it routed and not yet completed
                  (``cancel`` takes back one that never reached the replica)
    own queue:    a fluid queue of prefill tokens, +uncached on each routing, drained at the
                  deployment's prefill speed (tokens/s) as time passes

and a snapshot takes, for queued prefill tokens, max(reported queue aged by the time since the
report, own fluid queue), and for running requests, max(reported running + waiting, outstanding).
``max`` rather than a sum: the report already contains this router's older requests, while other
ingress replicas' requests appear only in the report. Both queues drain at one speed for every replica, the
mean of the speeds the replicas measured (``ReplicaStats.prefill_tokens_per_s``, routers.prefill_meter), else
the configured default: the policy prices prefill at that same mean, and a replica aged at its own speed would
look emptier than its peers whenever its last measurement happened to be fast (docs/routing.md, "Load
signal"). The mean is kept up to date when a report brings a new speed or a replica leaves, not recomputed per
snapshot. With ``measured_speed=False`` the replicas' speeds are ignored: queues age at the configured default
and snapshots carry speed 0, so the policy prices prefill at the default too (a fixed-speed A/B). Time is an
argument; memory is bounded by ``max_outstanding`` (oldest forgotten first if completions never arrive).

Snapshots are the adapter's per-decision cost (16 replicas x ~2 us), so one is reused while its
inputs are unchanged (same report object, no routing or completion on that replica) for at most
``SNAPSHOT_REUSE_S``: aging a 1-second-old estimate by 2 ms more changes nothing that matters.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from routers.types import ReplicaSnapshot

SNAPSHOT_REUSE_S = 0.002


class LoadTracker:
    """Per-replica outstanding requests and fluid prefill queue, plus their merge with reports."""

    def __init__(self, *, default_prefill_s_per_token: float, max_outstanding: int = 100_000,
                 measured_speed: bool = True) -> None:
        self._default_rate = 1.0 / default_prefill_s_per_token
        self._measured = measured_speed  # False: ignore the replicas' speeds; age at the default, report 0
        self._max = max_outstanding
        self._outstanding: dict[str, OrderedDict[str, int]] = {}
        self._queue: dict[str, tuple[float, float]] = {}  # replica -> (tokens, as of time)
        self._rate: dict[str, float] = {}
        self._drain = self._default_rate  # tokens/s every queue drains at: mean of _rate, else the default
        self._parsed: dict[str, tuple[Mapping[str, Any], tuple]] = {}  # replica -> (report, parsed)
        self._version: dict[str, int] = {}  # bumped by every change of the router's own accounting
        self._cache: dict[str, tuple[Any, int, int, float, ReplicaSnapshot]] = {}

    def on_routed(self, replica_id: str, request_id: str, uncached_tokens: int, now: float) -> None:
        """A request with ``uncached_tokens`` of prefill work was sent to ``replica_id``."""
        out = self._outstanding.setdefault(replica_id, OrderedDict())
        out[request_id] = uncached_tokens
        while len(out) > self._max:
            out.popitem(last=False)
        self._queue[replica_id] = (self._own_queue(replica_id, now) + uncached_tokens, now)
        self._version[replica_id] = self._version.get(replica_id, 0) + 1

    def cancel(self, replica_id: str, request_id: str, now: float) -> None:
        """A request counted by ``on_routed`` never reached ``replica_id``: its request and prefill tokens go."""
        out = self._outstanding.get(replica_id)
        tokens = out.pop(request_id, None) if out is not None else None
        if tokens is None:
            return
        self._queue[replica_id] = (max(0.0, self._own_queue(replica_id, now) - tokens), now)
        self._version[replica_id] = self._version.get(replica_id, 0) + 1

    def on_completed(self, replica_id: str, request_id: str) -> None:
        """The request finished (any outcome)."""
        out = self._outstanding.get(replica_id)
        if out is not None and out.pop(request_id, None) is not None:
            self._version[replica_id] = self._version.get(replica_id, 0) + 1

    def remove_replica(self, replica_id: str) -> None:
        self._parsed.pop(replica_id, None)
        self._cache.pop(replica_id, None)
        self._version.pop(replica_id, None)
        self._outstanding.pop(replica_id, None)
        self._queue.pop(replica_id, None)
        if self._rate.pop(replica_id, None) is not None:
            self._update_drain()

    def outstanding(self, replica_id: str) -> int:
        return len(self._outstanding.get(replica_id, ()))

    def snapshot(
        self, replica_id: str, stats: Mapping[str, Any] | None, max_ongoing: int, now: float
    ) -> ReplicaSnapshot:
        """What the policy sees of ``replica_id`` now. ``stats`` is ``asdict(ReplicaStats)`` or empty."""
        version = self._version.get(replica_id, 0)
        hit = self._cache.get(replica_id)
        if (
            hit is not None
            and hit[0] is stats
            and hit[1] == version
            and hit[2] == max_ongoing
            and 0.0 <= now - hit[3] <= SNAPSHOT_REUSE_S
        ):
            return hit[4]
        snap = self._fresh_snapshot(replica_id, stats, max_ongoing, now)
        self._cache[replica_id] = (stats, version, max_ongoing, now, snap)
        return snap

    def _fresh_snapshot(
        self, replica_id: str, stats: Mapping[str, Any] | None, max_ongoing: int, now: float
    ) -> ReplicaSnapshot:
        own_running = self.outstanding(replica_id)
        if not stats:
            return ReplicaSnapshot(
                replica_id=replica_id,
                queued_prefill_tokens=int(self._own_queue(replica_id, now)),
                running=own_running,
                max_ongoing=max_ongoing,
                has_stats=False,
            )
        cached = self._parsed.get(replica_id)
        if cached is None or cached[0] is not stats:
            cached = (stats, self._parse(replica_id, stats))
            self._parsed[replica_id] = cached
        rate, reported, ts, running, capacity, usage, block_size = cached[1]
        if ts > 0:
            reported = max(0.0, reported - self._drain * max(0.0, now - ts))
        return ReplicaSnapshot(
            replica_id=replica_id,
            queued_prefill_tokens=int(max(reported, self._own_queue(replica_id, now))),
            running=max(running, own_running),
            kv_capacity_blocks=capacity,
            kv_usage=usage,
            block_size=block_size,
            max_ongoing=max_ongoing,
            prefill_tokens_per_s=rate,
        )

    def _parse(self, replica_id: str, stats: Mapping[str, Any]) -> tuple:
        rate = float(stats.get("prefill_tokens_per_s") or 0.0) if self._measured else 0.0
        if rate > 0 and self._rate.get(replica_id) != rate:
            self._rate[replica_id] = rate
            self._update_drain()
        return (
            rate,
            float(stats.get("queued_prefill_tokens") or 0),
            float(stats.get("timestamp") or 0.0),
            int(stats.get("num_running") or 0) + int(stats.get("num_waiting") or 0),
            int(stats.get("num_gpu_blocks") or 0),
            float(stats.get("kv_usage") or 0.0),
            int(stats.get("block_size") or 16),
        )

    def _update_drain(self) -> None:
        rates = self._rate
        self._drain = sum(rates.values()) / len(rates) if rates else self._default_rate

    def _own_queue(self, replica_id: str, now: float) -> float:
        tokens, then = self._queue.get(replica_id, (0.0, now))
        return max(0.0, tokens - self._drain * max(0.0, now - then))
