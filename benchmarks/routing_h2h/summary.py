"""The head-to-head's verdict: issue 12's ratios, their targets, and the markdown table.

Owns ``summarize`` and ``table``. Results are ``{system: {workload: {level: headline}}}`` (``level``
= ``sat`` or ``rNN``). Ratios are ours / theirs at ``sat`` (the highest load) unless a target says
"every": then the key holds the worst value over the cells both systems ran and a ``*_by_*`` map
beside it holds each one. A ratio whose cells are missing or failed is ``None``, never a guess.
The top level is the default strategy (``RoutingConfig``'s); ``by_strategy`` repeats it for every
kvserve strategy that ran.
"""

from __future__ import annotations

from typing import Any

from serve_app.config.routing import RoutingConfig

DEFAULT_STRATEGY: str = RoutingConfig.model_fields["strategy"].default
ROUND_ROBIN = "round-robin"
RAY_ROUTER = "ray-prefix-cache-affinity"
TWO_INGRESS = f"{DEFAULT_STRATEGY}-2ingress"
ONE_INGRESS = f"{DEFAULT_STRATEGY}-1ingress"
SHARED_PREFIX = ("docqa", "multiturn", "mooncake")
TWO_INGRESS_WORKLOADS = ("docqa", "mooncake")
STRATEGIES = ("prefix-aware", "kv-aware")

#: key -> (comparison, bound). ``within``: |value - 1| <= bound; ``abs<=``: |value| <= bound (points).
TARGETS: dict[str, tuple[str, float]] = {
    "ttft_p50_ratio_vs_round_robin": ("<=", 0.3),           # docqa, sat
    "throughput_ratio_vs_round_robin": (">=", 1.8),         # docqa, sat
    "multiturn_ttft_p50_ratio_vs_round_robin": ("<=", 0.4),
    "mooncake_ttft_p50_ratio_vs_round_robin": ("<=", 0.5),
    "ttft_p50_ratio_vs_ray_router": ("<=", 0.5),            # every shared-prefix workload: the highest
    "no_sharing_ttft_p50_ratio": ("within", 0.05),          # every load: the furthest from 1
    "no_sharing_throughput_ratio": ("within", 0.05),        # every load: the furthest from 1
    "two_ingress_hit_rate_delta": ("abs<=", 3.0),           # points; docqa and mooncake, every load run
}


def _cell(results: dict, system: str, wl: str, level: str = "sat") -> dict:
    h = results.get(system, {}).get(wl, {}).get(level) or {}
    return {} if "error" in h else h


def _ratio(a: dict, b: dict, key: str) -> float | None:
    x, y = a.get(key), b.get(key)
    return round(x / y, 3) if x is not None and y else None


def _worst(values: dict[str, float | None], distance) -> float | None:
    known = [v for v in values.values() if v is not None]
    return max(known, key=distance) if known else None


def _levels(results: dict, a: str, b: str, wl: str) -> list[str]:
    theirs = results.get(b, {}).get(wl, {})
    return [lv for lv in results.get(a, {}).get(wl, {}) if lv in theirs]


def strategy_summary(results: dict, ours: str) -> dict[str, Any]:
    """Every ratio key of ``TARGETS`` but the two-ingress one, for the kvserve system ``ours``."""
    rr = ROUND_ROBIN

    def vs(system: str, wl: str, key: str = "ttft_p50_ms") -> float | None:
        return _ratio(_cell(results, ours, wl), _cell(results, system, wl), key)

    vs_ray = {wl: vs(RAY_ROUTER, wl) for wl in SHARED_PREFIX}
    ns = {lv: {"ttft_p50_ratio": _ratio(_cell(results, ours, "no-sharing", lv), _cell(results, rr, "no-sharing", lv),
                                        "ttft_p50_ms"),
               "throughput_ratio": _ratio(_cell(results, ours, "no-sharing", lv), _cell(results, rr, "no-sharing", lv),
                                          "output_tok_per_s")}
          for lv in _levels(results, ours, rr, "no-sharing")}

    def off_one(v: float) -> float:
        return abs(v - 1)

    return {
        "ttft_p50_ratio_vs_round_robin": vs(rr, "docqa"),
        "throughput_ratio_vs_round_robin": vs(rr, "docqa", "output_tok_per_s"),
        "multiturn_ttft_p50_ratio_vs_round_robin": vs(rr, "multiturn"),
        "mooncake_ttft_p50_ratio_vs_round_robin": vs(rr, "mooncake"),
        "ttft_p50_ratio_vs_ray_router": _worst(vs_ray, float),
        "ttft_p50_ratio_vs_ray_router_by_workload": vs_ray,
        "no_sharing_ttft_p50_ratio": _worst({lv: r["ttft_p50_ratio"] for lv, r in ns.items()}, off_one),
        "no_sharing_throughput_ratio": _worst({lv: r["throughput_ratio"] for lv, r in ns.items()}, off_one),
        "no_sharing_by_load": ns,
    }


def ingress_count(results: dict, system: str) -> int:
    """Ingress replicas ``system`` ran with: as recorded, else what its name says (the base config's count is
    recorded for the plain strategy; results of old code may lack it: one ingress then)."""
    recorded = results.get(system, {}).get("ingress_replicas")
    return int(recorded) if recorded else {TWO_INGRESS: 2}.get(system, 1)


def two_ingress(results: dict) -> dict[str, Any]:
    """Cache-hit rate of the default strategy on two ingress replicas minus on one, in points, per cell.

    The pair is the default strategy's system and its ingress variant: ``-2ingress`` when the base config
    runs one ingress, ``-1ingress`` when it runs two (each system's count is read from the results)."""
    by_count = {ingress_count(results, s): s for s in (DEFAULT_STRATEGY, ONE_INGRESS, TWO_INGRESS) if s in results}
    one, two = by_count.get(1), by_count.get(2)
    by: dict[str, float | None] = {}
    if one is not None and two is not None:
        for wl in TWO_INGRESS_WORKLOADS:
            for lv in _levels(results, two, one, wl):
                a = _cell(results, two, wl, lv).get("cache_hit_rate")
                b = _cell(results, one, wl, lv).get("cache_hit_rate")
                by[f"{wl}/{lv}"] = None if a is None or b is None else round(100 * (a - b), 1)
    return {"two_ingress_hit_rate_delta": _worst(by, abs), "two_ingress_hit_rate_delta_by_cell": by}


def met(key: str, value: float | None) -> bool | None:
    """Whether ``value`` meets the target of ``key`` (None: not measured)."""
    if value is None:
        return None
    op, bound = TARGETS[key]
    return {"<=": value <= bound, ">=": value >= bound, "within": abs(value - 1) <= bound + 1e-9,
            "abs<=": abs(value) <= bound}[op]


def _target_text(op: str, bound: float) -> str:
    return {"within": f"{1 - bound:.2f}..{1 + bound:.2f}", "abs<=": f"|x| <= {bound:g}"}.get(op, f"{op} {bound:g}")


def summarize(results: dict[str, dict]) -> dict[str, Any]:
    """Issue 12's keys for the default strategy, whether each meets its target, and the request counts."""
    top = strategy_summary(results, DEFAULT_STRATEGY) | two_ingress(results)
    requests = {system: {wl: {lv: h.get("completed") for lv, h in levels.items() if isinstance(h, dict)}
                         for wl, levels in r.items() if wl in workload_names(r)}
                for system, r in results.items()}
    return {"default_strategy": DEFAULT_STRATEGY, "load": "sat", **top,
            "targets": {k: _target_text(*t) for k, t in TARGETS.items()},
            "met": {k: met(k, top[k]) for k in TARGETS},
            "requests": requests,
            "by_strategy": {s: strategy_summary(results, s) for s in STRATEGIES if s in results}}


#: keys of a system's result that are not workloads.
META = frozenset({"routing", "ingress_replicas", "runs", "serve_env", "started_at", "ready_s", "error"})


def workload_names(system_result: dict) -> list[str]:
    return [k for k, v in system_result.items() if k not in META and isinstance(v, dict)]


LATE_NOTE = ("\\* measured in a run whose first cell began before every replica ran (`plan.started_late`): "
             "`--plan-missing` lists it again")


def table(results: dict[str, dict], late: dict[str, set[tuple[str, str]]] | None = None) -> str:
    """Markdown: one row per workload x load x system (a failed or cut cell: its error in the last column); a cell in
    ``late`` (system -> cells, ``plan.late_cells``) has its system marked ``*`` and a note under the table."""
    late = late or {}
    lines = ["| workload | load | system | requests | TTFT p50 ms | p90 | p99 | output tok/s | cache hit | errors |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    workloads = dict.fromkeys(wl for r in results.values() for wl in workload_names(r))
    for wl in workloads:
        levels = dict.fromkeys(lv for r in results.values() for lv in r.get(wl, {}))
        for lv in levels:
            for system, r in results.items():
                h = r.get(wl, {}).get(lv)
                if not h:
                    continue
                if "error" in h:
                    lines.append(f"| {wl} | {lv} | {system} | - | - | - | - | - | - | {h['error']} |")
                    continue
                hit = "-" if h["cache_hit_rate"] is None else f"{h['cache_hit_rate']:.2f}"
                name = f"{system} \\*" if (wl, lv) in late.get(system, ()) else system
                lines.append(f"| {wl} | {lv} | {name} | {h.get('completed', '-')} | {h['ttft_p50_ms']:.0f} | "
                             f"{h['ttft_p90_ms']:.0f} | {h['ttft_p99_ms']:.0f} | {h['output_tok_per_s']:.1f} | {hit} | "
                             f"{h['errors']} |")
    if any(late.values()):
        lines += ["", LATE_NOTE]
    return "\n".join(lines) + "\n"
