"""Where the time to first token goes, per system: a stacked bar chart from a serving_overhead.py JSON.

Owns the PNG of the request-path stages. For each run that has them, kvserve's bar stacks the
``kvserve_stage_*`` means (deployments.stages.STAGES) and what the client saw beyond them ("client + HTTP");
``vllm serve``'s bar stacks vLLM's own queue and prefill means, the rest of vLLM's own TTFT histogram (its server's
work before the engine: rendering, tokenizing) and what the client saw beyond that.
One panel per concurrency.

Usage: python benchmarks/gpu/plot_stages.py benchmarks/results/serving_stages_cpu.json docs/img/serving_stages_cpu.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from deployments.stages import STAGES


def bars(run: dict, conc: str) -> list[tuple[str, float]]:
    """(segment, ms) of one run at one concurrency, bottom to top."""
    r = run.get(conc) or {}
    ttft = r.get("mean_ttft_ms") or 0.0
    stages = r.get("stages_ms") or {}
    if any(stages.get(s) for s in STAGES):
        segs = [(s, stages.get(s) or 0.0) for s in STAGES]
    else:
        engine = r.get("engine_ms") or {}
        queue, prefill = engine.get("queue") or 0.0, engine.get("prefill") or 0.0
        segs = [("engine queue", queue), ("engine prefill", prefill)]
        if engine.get("ttft"):  # vLLM's own TTFT starts when its server received the request
            segs.append(("vLLM server before the engine (render, tokenize)",
                         max(engine["ttft"] - queue - prefill, 0.0)))
    rest = max(ttft - sum(ms for _, ms in segs), 0.0)
    return [*segs, ("client + HTTP + unaccounted", rest)]


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    runs = [r for r in json.loads(src.read_text())["runs"] if r.get("c1")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors: dict[str, str] = {}
    palette = plt.get_cmap("tab10").colors
    for ax, conc in zip(axes, ("c1", "c64"), strict=True):
        labels = []
        for i, run in enumerate(r for r in runs if r.get(conc)):
            bottom = 0.0
            for seg, ms in bars(run, conc):
                color = colors.setdefault(seg, palette[len(colors) % len(palette)])
                ax.bar(i, ms, bottom=bottom, color=color, label=seg if seg not in ax.get_legend_handles_labels()[1]
                       else None)
                bottom += ms
            labels.append(f"{run['system']}\n{run['run']}")
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("mean time to first token (ms)")
        ax.set_title(f"concurrency {conc[1:]}")
    handles = {lab: h for a in axes for h, lab in zip(*a.get_legend_handles_labels(), strict=True)}
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
