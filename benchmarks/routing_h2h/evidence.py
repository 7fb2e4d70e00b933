"""Where a head-to-head cell's requests went: Ray's Prometheus metrics before and after the cell, as small deltas.

Owns the per-cell ``evidence`` of ``run.py``: ``metrics_url`` (the node's MetricsExportPort, found once per
system through ``ray.init(address="auto")``), ``Probe`` (scrapes before and after each cell and, every
``interval_s`` during it, a timeline; never raises: a failure is an ``error`` string in the evidence),
and ``derive`` (pure: two parsed scrapes -> the evidence dict; ``evidence_table.py`` renders it as markdown).
Only the metrics named below are kept, never the whole text:

* Ray Serve's own per-replica counter ``ray_serve_deployment_request_counter_total{deployment, replica}`` of
  the vLLM deployment -> ``requests_by_replica``, ``balance`` (max / mean over the deployment's replicas,
  zeros included: a replica seen in any Serve metric but never sent a request counts);
* ``ray_kvserve_router_decisions_total{reason}`` -> ``decisions_by_reason`` and ``decision_shares``;
  ``kvserve_router_decision_latency_microseconds`` and ``kvserve_stage_route_milliseconds`` (handle call to
  decision: Serve's queueing plus the decision; the router's event loop shows here) as means; for Ray's router
  (``ray_router.py``) also its steps, ``kvserve_router_ray_call_milliseconds{call}`` -> ``ray_router_ms`` (match,
  probe, insert, routed: count, mean, p50, p90);
* ``ray_kvserve_router_kv_events_total{replica}`` -> ``kv_events_by_replica`` (+ resets), predicted and actual
  cached tokens;
* vLLM's per-replica metrics through Ray's agent (``ray_vllm_*{ReplicaId}``): requests finished, queue /
  prefill / TTFT means, p50s and p90s (from the histogram buckets), prefix-cache hit rate, preemptions ->
  ``engine_by_replica``;
* the request-path stages of the client's TTFT (``kvserve_stage_{tokenize,hash,dispatch,engine,return,first_byte}_
  milliseconds``, deployments/stages.py) -> ``stages_ms`` (all replicas) and ``engine_stage_ms_by_replica``: which
  part of the TTFT grew, the engine's (replica received -> first output) or the serving path's around it; and the
  engine stage split by vLLM's own request stamps (``kvserve_engine_{replica,vllm_frontend,vllm_queue,vllm_prefill}_
  milliseconds``) -> ``engine_parts_ms``;
* the host's CPU (``host_cpu``, for the cell and in every timeline point; ``host_cpu.py``): busy cores, cores
  per process role, each replica's and ingress's process and busiest thread (an asyncio loop at one core);
* gauges by replica (``view``, in every timeline point and as ``view_after``): Serve's ongoing requests,
  the router's in-flight count / queued-prefill estimate / prefill rate as its policy last saw them
  (``kvserve_router_outstanding_requests`` ...), the replica's own queued prefill tokens, event-loop lag and busy
  share, and each ingress replica's event-loop lag and busy share (``ingress_loop_lag_ms``, ``ingress_loop_busy``,
  by ingress replica): a dispatch stage that grows with the ingress's lag waited in the ingress, one that grows with
  the replicas' waited at the replica; a loop that lags while its thread is rarely on a CPU waited for the GIL (another
  thread of its process) or for the host's cores, one that lags while busy did its own work.

Replica ids are Serve's ``unique_id`` in all three sources (``replica``, ``ReplicaId``). Ray 2.60's agent
rebuilds histograms from bucket counts, so a histogram's ``_sum`` (hence every ``*_mean`` here) is a bucket-midpoint
approximation; the p50s and p90s interpolate the buckets. Counters are exact.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.gpu.promtext import parse
from benchmarks.routing_h2h.host_cpu import HostCpu, ProcReading
from deployments.stages import ENGINE_PARTS, STAGES

Samples = dict[tuple[str, str], float]

#: the server's environment for the scrapes: Ray's agent exports every second (default 10 s), so the scrape
#: ``settle_s`` after a cell sees all of it.
SERVER_ENV = {"RAY_metrics_report_interval_ms": "1000"}

SERVE_REQUESTS = "ray_serve_deployment_request_counter"
DECISIONS = "ray_kvserve_router_decisions"
KV_EVENTS = "ray_kvserve_router_kv_events"
KV_RESETS = "ray_kvserve_router_kv_event_resets"
DECISION_US = "ray_kvserve_router_decision_latency_microseconds"
ROUTE_MS = "ray_kvserve_stage_route_milliseconds"
RAY_CALL_MS = "ray_kvserve_router_ray_call_milliseconds"
#: stage -> histogram (ms) of deployments.stages.STAGES, tagged model and replica.
STAGE_MS = {stage: f"ray_kvserve_stage_{stage}_milliseconds" for stage in STAGES}
#: part -> histogram (ms) of deployments.stages.ENGINE_PARTS: the replica's engine stage split by vLLM's request stats.
ENGINE_PART_MS = {part: f"ray_kvserve_engine_{part}_milliseconds" for part in ENGINE_PARTS}
PREDICTED = "ray_kvserve_router_predicted_cached_tokens"
ACTUAL = "ray_kvserve_router_actual_cached_tokens"
#: key in ``engine_by_replica`` -> vLLM histogram (seconds) through Ray's agent.
VLLM_HISTOGRAMS = {"queue": "ray_vllm_request_queue_time_seconds", "prefill": "ray_vllm_request_prefill_time_seconds",
                   "ttft": "ray_vllm_time_to_first_token_seconds"}
VLLM_FINISHED = "ray_vllm_request_success"
VLLM_HITS, VLLM_QUERIES = "ray_vllm_prefix_cache_hits", "ray_vllm_prefix_cache_queries"
VLLM_PREEMPTIONS = "ray_vllm_num_preemptions"
#: timeline key -> vLLM's gauge by ``ReplicaId`` at a point: requests running and waiting in its scheduler, and the
#: share of its KV blocks in use (a cell whose engines sit idle while its client waits is not the engines' load)
VLLM_GAUGES = {"vllm_running": "ray_vllm_num_requests_running", "vllm_waiting": "ray_vllm_num_requests_waiting",
               "vllm_kv_usage": "ray_vllm_kv_cache_usage_perc"}
SERVE_ONGOING = "ray_serve_replica_processing_queries"
#: timeline key -> gauge by replica: what the router's policy sees (set every second by the router)
#: and what the replica itself reports.
VIEW_GAUGES = {"router_outstanding": "ray_kvserve_router_outstanding_requests",
               "router_queued_prefill_tokens": "ray_kvserve_router_queued_prefill_tokens",
               "router_prefill_tps": "ray_kvserve_router_prefill_tokens_per_s",
               "replica_queued_prefill_tokens": "ray_kvserve_replica_queued_prefill_tokens",
               "replica_loop_lag_ms": "ray_kvserve_replica_loop_lag_milliseconds",
               "replica_loop_busy": "ray_kvserve_replica_loop_busy_ratio",
               "ingress_loop_lag_ms": "ray_kvserve_ingress_loop_lag_milliseconds",
               "ingress_loop_busy": "ray_kvserve_ingress_loop_busy_ratio"}
_KEEP = (SERVE_REQUESTS, SERVE_ONGOING, "ray_serve_deployment_replica_starts", "ray_kvserve_router_",
         "ray_kvserve_replica_queued_prefill_tokens", "ray_kvserve_replica_loop_lag", "ray_kvserve_replica_loop_busy",
         "ray_kvserve_ingress_loop_lag", "ray_kvserve_ingress_loop_busy", "ray_kvserve_stage_", "ray_kvserve_engine_",
         "ray_vllm_request_queue_time_seconds", "ray_vllm_request_prefill_time_seconds",
         "ray_vllm_time_to_first_token_seconds", VLLM_FINISHED, VLLM_HITS, VLLM_QUERIES, VLLM_PREEMPTIONS,
         *VLLM_GAUGES.values())
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def labels(text: str) -> dict[str, str]:
    """``{a="x",b="y"}`` -> {a: x, b: y}."""
    return dict(_LABEL.findall(text))


def keep(samples: Samples) -> Samples:
    """Only the samples ``derive`` reads (a Ray node exports thousands)."""
    return {k: v for k, v in samples.items() if k[0].startswith(_KEEP)}


def _base(name: str) -> str:
    """A counter's name without the ``_total`` Ray's exporter appends (some versions do not)."""
    return name.removesuffix("_total")


def sums(samples: Samples, metric: str, by: str | None = None, where: dict[str, str] | None = None,
         suffix: str = "") -> dict[str, float]:
    """``metric`` (+ ``suffix``; counters with or without ``_total``) summed over series, grouped by label ``by``
    ("" when None or missing), keeping only series whose labels match ``where``."""
    out: dict[str, float] = {}
    for (name, text), v in samples.items():
        if (_base(name) if not suffix else name) != metric + suffix:
            continue
        lab = labels(text)
        if where and any(lab.get(k) != want for k, want in where.items()):
            continue
        key = lab.get(by, "") if by else ""
        out[key] = out.get(key, 0.0) + v
    return out


def delta(before: Samples, after: Samples, metric: str, by: str | None = None,
          where: dict[str, str] | None = None, suffix: str = "") -> dict[str, float]:
    """Per-group increase of a counter between two scrapes (a group gone or reset counts from zero)."""
    b, a = sums(before, metric, by, where, suffix), sums(after, metric, by, where, suffix)
    return {k: (v - b.get(k, 0.0) if v >= b.get(k, 0.0) else v) for k, v in a.items()}


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def _quantile_bucket(buckets: dict[float, float], q: float) -> tuple[float, float, float, float, float] | None:
    """(rank, lower edge, count below it, upper edge, count up to it) of the bucket that holds quantile ``q`` of
    cumulative bucket counts {le: count}; the upper edge is inf past the last bucket."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    rank, prev_le, prev_n = q * items[-1][1], 0.0, 0.0
    for le, n in items:
        if n >= rank:
            return rank, prev_le, prev_n, le, n
        prev_le, prev_n = le, n
    return rank, prev_le, prev_n, float("inf"), prev_n


def bucket_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus-style quantile of cumulative bucket counts {le: count} (linear within a bucket)."""
    if (found := _quantile_bucket(buckets, q)) is None:
        return None
    rank, lo, lo_n, hi, hi_n = found
    if hi == float("inf"):
        return lo
    return lo + (hi - lo) * ((rank - lo_n) / (hi_n - lo_n) if hi_n > lo_n else 0.0)


def bucket_bounds(buckets: dict[float, float], q: float) -> tuple[float, float] | None:
    """The bucket (lower, upper edge) that holds quantile ``q``: how far an interpolated quantile can be off."""
    found = _quantile_bucket(buckets, q)
    return None if found is None else (found[1], found[3])


def histogram(before: Samples, after: Samples, metric: str, by: str, scale: float = 1.0) -> dict[str, dict]:
    """Per-group count, mean, p50 and p90 of a histogram between two scrapes (values x ``scale``), and the
    bucket each quantile lies in (``p50_bucket``, ``p90_bucket``: vLLM's request-latency buckets start at
    0.3 s, so a p50 of 150 ms there only says "under 300 ms")."""
    count = delta(before, after, metric, by, suffix="_count")
    total = delta(before, after, metric, by, suffix="_sum")
    b_buckets: dict[tuple[str, float], float] = {}
    a_buckets: dict[tuple[str, float], float] = {}
    for samples, dest in ((before, b_buckets), (after, a_buckets)):
        for (name, text), v in samples.items():
            if name == metric + "_bucket":
                lab = labels(text)
                try:
                    key = (lab.get(by, ""), float(lab.get("le", "nan")))
                except ValueError:
                    continue
                dest[key] = dest.get(key, 0.0) + v
    out = {}
    for group, n in count.items():
        if n <= 0:
            continue
        buckets = {le: v - b_buckets.get((g, le), 0.0) for (g, le), v in a_buckets.items() if g == group}
        p50, p90 = bucket_quantile(buckets, 0.5), bucket_quantile(buckets, 0.9)
        out[group] = {"n": round(n), "mean": _r(total.get(group, 0.0) / n * scale, 2),
                      "p50": _r(None if p50 is None else p50 * scale, 2),
                      "p90": _r(None if p90 is None else p90 * scale, 2)}
        for q, key in ((0.5, "p50_bucket"), (0.9, "p90_bucket")):
            if (edges := bucket_bounds(buckets, q)) is not None:
                out[group][key] = [_r(e * scale, 2) if e != float("inf") else None for e in edges]
    return out


def replicas_of(samples: Samples, deployment: str) -> set[str]:
    """Replicas of ``deployment`` named by any of Serve's own per-replica metrics."""
    out = set()
    for (name, text) in samples:
        if name.startswith("ray_serve_"):
            lab = labels(text)
            if lab.get("deployment") == deployment and lab.get("replica"):
                out.add(lab["replica"])
    return out


def _shares(counts: dict[str, float]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: round(v / total, 3) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])} if total else {}


def _mean(before: Samples, after: Samples, metric: str) -> float | None:
    n = sum(delta(before, after, metric, suffix="_count").values())
    return _r(sum(delta(before, after, metric, suffix="_sum").values()) / n, 2) if n > 0 else None


def balance(requests: dict[str, float], replicas: int) -> float | None:
    """max / mean requests per replica over ``replicas`` (those with none included); None without requests."""
    total = sum(requests.values())
    if not total or not replicas:
        return None
    return round(max(requests.values()) / (total / replicas), 3)


def engine_by_replica(before: Samples, after: Samples) -> dict[str, dict[str, Any]]:
    """vLLM's own per-replica figures (``ReplicaId``): requests finished, queue / prefill / TTFT in ms, prefix-cache
    hit rate (tokens), preemptions."""
    rid = "ReplicaId"
    out: dict[str, dict[str, Any]] = {}

    def put(replica: str, key: str, value: Any) -> None:
        if replica:
            out.setdefault(replica, {})[key] = value

    for replica, n in delta(before, after, VLLM_FINISHED, rid).items():
        put(replica, "finished", round(n))
    for key, metric in VLLM_HISTOGRAMS.items():
        for replica, h in histogram(before, after, metric, rid, 1000.0).items():
            put(replica, f"{key}_ms_mean", h["mean"])
            put(replica, f"{key}_ms_p50", h["p50"])
            put(replica, f"{key}_ms_p90", h["p90"])
    hits, queries = delta(before, after, VLLM_HITS, rid), delta(before, after, VLLM_QUERIES, rid)
    for replica, q in queries.items():
        put(replica, "prefix_hit_rate", round(hits.get(replica, 0.0) / q, 3) if q > 0 else None)
    for replica, n in delta(before, after, VLLM_PREEMPTIONS, rid).items():
        put(replica, "preemptions", round(n))
    return dict(sorted(out.items()))


def requests_by_replica(before: Samples, after: Samples, deployment: str) -> tuple[dict[str, int], int]:
    """Serve's per-replica request counts of ``deployment`` (every replica it names, zeros included) and how many
    replicas that is."""
    req = delta(before, after, SERVE_REQUESTS, "replica", {"deployment": deployment})
    names = replicas_of(after, deployment) | set(req)
    return {r: round(req.get(r, 0.0)) for r in sorted(names)}, len(names)


def derive(before: Samples, after: Samples, deployment: str) -> dict[str, Any]:
    """The evidence of one cell from the scrapes around it (pure)."""
    req, n = requests_by_replica(before, after, deployment)
    decisions = {k: round(v) for k, v in delta(before, after, DECISIONS, "reason").items() if round(v)}
    kv = {k: round(v) for k, v in delta(before, after, KV_EVENTS, "replica").items()}
    resets = sum(delta(before, after, KV_RESETS, "replica").values())
    predicted = sum(delta(before, after, PREDICTED).values())
    actual = sum(delta(before, after, ACTUAL).values())
    return {
        "deployment": deployment, "replicas": n, "requests": sum(req.values()), "requests_by_replica": req,
        "balance": balance(req, n),
        "decisions_by_reason": dict(sorted(decisions.items(), key=lambda kv: -kv[1])),
        "decision_shares": _shares(decisions),
        # > 1: Serve asked the router again for some requests (a replica rejected: full), or requests in flight
        # at the cell's end (Serve counts a request when it finishes, the router when it decides)
        "decisions_per_request": round(sum(decisions.values()) / sum(req.values()), 3) if sum(req.values()) else None,
        "decision_latency_us_mean": _mean(before, after, DECISION_US),
        "route_wait_ms_mean": _mean(before, after, ROUTE_MS),
        "ray_router_ms": histogram(before, after, RAY_CALL_MS, "call"),
        "kv_events_by_replica": dict(sorted(kv.items())), "kv_events": sum(kv.values()),
        "kv_event_resets": round(resets),
        "predicted_cached_tokens": round(predicted), "actual_cached_tokens": round(actual),
        "engine_by_replica": engine_by_replica(before, after),
        "stages_ms": stages(before, after),
        "engine_parts_ms": stages(before, after, ENGINE_PART_MS),
        "engine_stage_ms_by_replica": histogram(before, after, STAGE_MS["engine"], "replica"),
        "view_after": view(after, deployment),
    }


def stages(before: Samples, after: Samples, metrics: dict[str, str] = STAGE_MS) -> dict[str, dict]:
    """Count, mean, p50 and p90 (ms) of each request-path stage (or each histogram of ``metrics``) over every
    replica and model."""
    out = {}
    for stage, metric in metrics.items():
        h = histogram(before, after, metric, "")
        if h:
            out[stage] = h[""]
    return out


def view(samples: Samples, deployment: str) -> dict[str, dict[str, float]]:
    """Gauges by replica at one scrape: Serve's ongoing requests per replica of ``deployment`` (``ongoing``) and
    ``VIEW_GAUGES`` (the router's in-flight count, its queued-prefill estimate and prefill rate; the replica's own
    queued prefill). A router count far above ``ongoing``, growing, is a completion the router never saw."""
    out = {"ongoing": sums(samples, SERVE_ONGOING, "replica", {"deployment": deployment})}
    out |= {key: sums(samples, metric, "replica") for key, metric in VIEW_GAUGES.items()}
    return {k: {r: round(v, 1) for r, v in sorted(g.items()) if r} for k, g in out.items() if g}


def timeline_point(before: Samples, after: Samples, deployment: str, t_s: float) -> dict[str, Any]:
    """One interval of the timeline: requests per replica, vLLM queue mean (ms), requests finished and preemptions per
    replica, decisions by reason (deltas over the interval), ``view`` at its end and vLLM's ``VLLM_GAUGES`` there."""
    req, _ = requests_by_replica(before, after, deployment)
    queue = histogram(before, after, VLLM_HISTOGRAMS["queue"], "ReplicaId", 1000.0)
    decisions = {k: round(v) for k, v in delta(before, after, DECISIONS, "reason").items() if round(v)}
    engines = {key: {r: round(v) for r, v in sorted(delta(before, after, metric, "ReplicaId").items()) if r}
               for key, metric in (("vllm_finished", VLLM_FINISHED), ("vllm_preemptions", VLLM_PREEMPTIONS))}
    engines |= {key: {r: round(v, 3) for r, v in sorted(sums(after, metric, "ReplicaId").items()) if r}
                for key, metric in VLLM_GAUGES.items()}
    return {"t_s": round(t_s, 1), "requests": req, "queue_ms_mean": {r: h["mean"] for r, h in sorted(queue.items())},
            "decisions": decisions, **view(after, deployment), **{k: v for k, v in engines.items() if v}}


def fetch(url: str, timeout_s: float = 10) -> Samples:
    """One scrape of ``url``, only the kept samples (raises on failure)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return keep(parse(r.read().decode()))


DISCOVERY = "/tmp/ray/prom_metrics_service_discovery.json"


def node_metrics_url() -> str:
    """The metrics-export URL of the first alive node of the Ray this process is connected to."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def metrics_url() -> str:
    """The metrics-export URL of the running cluster's (first alive) node, through ``ray.init(address="auto")`` (the
    driver connection is closed again); if that fails, the target of Ray's Prometheus service-discovery file that
    exports Serve's metrics."""
    try:
        import ray

        ray.init(address="auto", namespace="kvserve_routing_h2h", logging_level="ERROR", log_to_driver=False)
        try:
            return node_metrics_url()
        finally:
            ray.shutdown()
    except Exception as err:  # noqa: BLE001 - try the file Ray writes for Prometheus
        first = _err(err)
    try:
        targets = [t for group in json.loads(Path(DISCOVERY).read_text()) for t in group.get("targets", [])]
    except (OSError, ValueError) as err:
        raise RuntimeError(f"ray.init: {first}; {DISCOVERY}: {_err(err)}") from None
    for target in targets:
        url = f"http://{target}/metrics"
        try:
            if any(name.startswith("ray_serve_") for name, _ in fetch(url, timeout_s=5)):
                return url
        except Exception:  # noqa: BLE001,S112 - the next target
            continue
    raise RuntimeError(f"ray.init: {first}; no target of {DISCOVERY} ({targets}) exports ray_serve_ metrics")


def _err(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300]


class Probe:
    """Evidence for the cells of one running system. ``start()`` before a cell, ``finish()`` after it -> the
    cell's ``evidence`` (always a dict; an ``error`` key when the scrapes failed)."""

    def __init__(self, deployment: str, interval_s: float = 5.0, settle_s: float = 3.0,
                 url: str | None = None) -> None:
        self.deployment, self.interval_s, self.settle_s = deployment, interval_s, settle_s
        self.url, self.error = url, None
        if url is None:
            try:
                self.url = metrics_url()
            except Exception as err:  # noqa: BLE001 - evidence is optional; the cell runs without it
                self.error = f"metrics url: {_err(err)}"
        self._before: Samples | None = None
        self._t0 = 0.0
        self._timeline: list[dict] = []
        self._cpu = HostCpu()
        self._cpu_start: tuple[float, ProcReading | None] = (0.0, None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _scrape(self) -> Samples | None:
        if self.url is None:
            return None
        try:
            return fetch(self.url)
        except Exception as err:  # noqa: BLE001 - recorded in the cell
            self.error = f"scrape: {_err(err)}"
            return None

    def start(self) -> None:
        self.error = None if self.url else self.error
        self._before, self._t0, self._timeline = self._scrape(), time.monotonic(), []
        self._cpu_start = (time.monotonic(), self._cpu.read())
        self._stop.clear()
        if self._before is not None and self.interval_s > 0:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        prev, cpu_prev = self._before, self._cpu_start
        while not self._stop.wait(self.interval_s) and prev is not None:
            now = self._scrape()
            if now is None:
                return
            cpu_now = (time.monotonic(), self._cpu.read())
            try:
                point = timeline_point(prev, now, self.deployment, time.monotonic() - self._t0)
                if cpu_prev[1] is not None and cpu_now[1] is not None:
                    point["host_cpu"] = self._cpu.usage(cpu_prev[1], cpu_now[1], cpu_now[0] - cpu_prev[0])
                self._timeline.append(point)
            except Exception as err:  # noqa: BLE001
                self.error = f"timeline: {_err(err)}"
                return
            prev, cpu_prev = now, cpu_now

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None
        if self._before is None:
            return {"error": self.error or "no scrape before the cell"}
        cpu_end = (time.monotonic(), self._cpu.read())
        time.sleep(self.settle_s)  # Serve caches its counters ~0.1 s, Ray's agent exports every second (run.py)
        after = self._scrape()
        if after is None:
            return {"error": self.error}
        try:
            out = derive(self._before, after, self.deployment)
        except Exception as err:  # noqa: BLE001
            return {"error": f"derive: {_err(err)}"}
        out["window_s"] = round(time.monotonic() - self._t0, 1)
        out["interval_s"] = self.interval_s
        out["timeline"] = self._timeline
        if self._cpu_start[1] is not None and cpu_end[1] is not None:
            out["host_cpu"] = self._cpu.usage(self._cpu_start[1], cpu_end[1], cpu_end[0] - self._cpu_start[0])
        if self.error:
            out["error"] = self.error
        return out
