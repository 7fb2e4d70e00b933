"""The head-to-head's evidence as markdown: one row per cell that has evidence (``evidence.derive``), beside
``summary.table``.

Owns ``result_markdown`` (a result's .md: that table, its late-start cells marked, then this one), ``evidence_table``
and its cell formatters: requests per replica and their balance, top decision reasons,
KV events, route wait (with Ray's router's steps), vLLM's queue time by replica, the stages' p50s, the engine
stage's mean beside its parts' (vLLM's request stamps), the event loops' worst lag and the host's CPU.
"""

from __future__ import annotations

from benchmarks.routing_h2h import plan
from benchmarks.routing_h2h.summary import table
from deployments.stages import ENGINE_PARTS


def _top(shares: dict[str, float], n: int = 2) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in list(shares.items())[:n]) or "-"


def _spread(by_replica: dict[str, dict], key: str) -> str:
    vals = [v[key] for v in by_replica.values() if v.get(key) is not None]
    return f"{min(vals):.0f}..{max(vals):.0f}" if vals else "-"


def evidence_table(results: dict[str, dict]) -> str:
    """Markdown: per cell with evidence, requests per replica (max/mean), top decision reasons, KV events, route
    wait, vLLM's queue-time mean range over replicas, the stages, the event loops' worst lag and the host's CPU;
    "" when no cell has evidence."""
    from benchmarks.routing_h2h.summary import workload_names

    rows = []
    for system, r in results.items():
        for wl in workload_names(r):
            for lv, h in r[wl].items():
                ev = (h or {}).get("evidence") if isinstance(h, dict) else None
                if not ev:
                    continue
                if "requests_by_replica" not in ev:
                    rows.append(f"| {wl} | {lv} | {system} | {ev.get('error', '-')} | | | | | | | | | |")
                    continue
                bal = "-" if ev["balance"] is None else f"{ev['balance']:.2f}"
                route = "-" if ev.get("route_wait_ms_mean") is None else f"{ev['route_wait_ms_mean']:.1f}"
                if ev.get("ray_router_ms"):  # Ray's router: its steps' means
                    route += " (" + ", ".join(f"{k} {v['mean']:.1f}" for k, v in sorted(ev["ray_router_ms"].items()))
                    route += ")"
                per = "/".join(str(v) for v in ev["requests_by_replica"].values())
                rows.append(f"| {wl} | {lv} | {system} | {per} | {bal} | {_top(ev['decision_shares'])} | "
                            f"{ev['kv_events']} | {route} | {_spread(ev['engine_by_replica'], 'queue_ms_mean')} | "
                            f"{_stage_p50s(ev.get('stages_ms') or {})} | {_engine_parts(ev)} | {_loop_lag(ev)} | "
                            f"{_host_cpu(ev)} |")
    if not rows:
        return ""
    return ("| workload | load | system | requests per replica | max/mean | top reasons | KV events | route wait ms | "
            "vLLM queue ms (replica min..max) | stage p50 ms (tokenize/dispatch/engine/return/first byte) | "
            "engine stage mean ms = replica + vLLM front end + queue + prefill (means) | "
            "worst loop lag ms, busy share (ingress / replica) | "
            "host cores busy (cell / busiest interval), busiest serving thread |\n"
            "|---|---|---|---|---:|---|---:|---:|---:|---|---|---|---|\n" + "\n".join(rows) + "\n")


def _loop_lag(ev: dict) -> str:
    """The highest smoothed event-loop lag any ingress replica and any vLLM replica showed at a timeline point, with
    that loop's busy share at the same point where the timeline has it."""
    def worst(role: str) -> str:
        vals = [(v, (p.get(f"{role}_loop_busy") or {}).get(r)) for p in ev.get("timeline", [])
                for r, v in (p.get(f"{role}_loop_lag_ms") or {}).items()]
        if not vals:
            return "-"
        lag, busy = max(vals, key=lambda x: x[0])
        return f"{lag:.0f}" if busy is None else f"{lag:.0f} ({busy:.2f})"

    return f"{worst('ingress')} / {worst('replica')}"


def _host_cpu(ev: dict) -> str:
    """``busy/cores (peak)``, and the busiest replica or ingress thread of any interval (role, cores)."""
    cell = ev.get("host_cpu")
    if not cell:
        return "-"
    points = [p["host_cpu"] for p in ev.get("timeline", []) if p.get("host_cpu")]
    peak = max((p["busy_cores"] for p in points), default=cell["busy_cores"])
    threads = [(q["busiest_thread_cores"], q["role"]) for p in (points or [cell]) for q in p.get("processes", [])]
    top = max(threads, default=None)
    thread = f", {top[1]} thread {top[0]:.2f}" if top else ""
    return f"{cell['busy_cores']:.1f}/{cell['cores']} ({peak:.1f}){thread}"


def _engine_parts(ev: dict) -> str:
    """The engine stage's mean beside its parts' means (``ENGINE_PARTS`` order; means add up, p50s do not);
    "-" for cells recorded before the parts were."""
    parts = ev.get("engine_parts_ms") or {}
    if not parts:
        return "-"
    engine = (ev.get("stages_ms") or {}).get("engine", {}).get("mean")
    vals = "+".join("-" if parts.get(k, {}).get("mean") is None else f"{parts[k]['mean']:.1f}" for k in ENGINE_PARTS)
    return f"{'-' if engine is None else f'{engine:.1f}'} = {vals}"


def _stage_p50s(stages_ms: dict[str, dict]) -> str:
    keys = ("tokenize", "dispatch", "engine", "return", "first_byte")
    vals = [stages_ms.get(k, {}).get("p50") for k in keys]
    return "-" if all(v is None for v in vals) else "/".join("-" if v is None else f"{v:.0f}" for v in vals)


def result_markdown(results: dict[str, dict]) -> str:
    """A result's .md: ``summary.table`` with the cells of late-starting runs marked (``plan.late_cells``), then
    ``evidence_table``."""
    late = {system: plan.late_cells(res) for system, res in results.items()}
    return table(results, late) + "\n" + evidence_table(results)
