"""The routing head-to-head as one PNG: TTFT p50 against load, one panel per workload, one line per system.

Owns the docs PNG of ``docs/routing.md``. Reads a ``benchmarks.routing_h2h.run`` result JSON; the x axis is the
offered load as a fraction of round-robin's saturated rate (``rNN`` = NN %, ``sat`` = closed loop at
saturation, drawn at 100 %); cells missing or failed are left out, never interpolated. Also rewrites the
markdown table beside the JSON (``summary.table``) so both come from the same file.

Usage: python -m benchmarks.routing_h2h.plot RESULT.json OUT.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.routing_h2h.evidence_table import result_markdown
from benchmarks.routing_h2h.summary import workload_names


def level_x(level: str) -> float:
    """``sat`` -> 1.0, ``r25`` -> 0.25."""
    return 1.0 if level == "sat" else int(level[1:]) / 100


def series(results: dict[str, dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{workload: {system: [(load, ttft_p50_ms), ...]}}`` sorted by load, good cells only."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for system, r in results.items():
        for wl in workload_names(r):
            pts = sorted((level_x(lv), h["ttft_p50_ms"]) for lv, h in r[wl].items() if h and "error" not in h)
            if pts:
                out.setdefault(wl, {})[system] = pts
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result")
    p.add_argument("out")
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(Path(a.result).read_text())
    Path(a.result).with_suffix(".md").write_text(result_markdown(doc["results"]))
    data = series(doc["results"])
    fig, axes = plt.subplots(1, len(data), figsize=(4.2 * len(data), 3.8), squeeze=False)
    names = list(dict.fromkeys(system for systems in data.values() for system in systems))
    colors = {name: f"C{i}" for i, name in enumerate(names)}  # one colour per system in every panel
    for ax, (wl, systems) in zip(axes[0], data.items(), strict=True):
        for system, pts in systems.items():
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=colors[system], label=system)
        ax.set_title(wl, fontsize=10)
        ax.set_xlabel("load (fraction of round-robin's saturated rate)")
        ax.set_xlim(0, 1.1)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TTFT p50 (ms)")
    handles = [plt.Line2D([], [], color=colors[n], marker="o", label=n) for n in names]
    fig.legend(handles=handles, loc="lower center", ncol=len(names), fontsize=8)
    machine = doc.get("machine", {})
    fig.suptitle(f"routing head-to-head, {', '.join(machine.get('gpus') or []) or machine.get('hostname', '')}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
