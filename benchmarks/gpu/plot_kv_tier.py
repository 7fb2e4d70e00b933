"""The KV tier's GPU figures as one PNG: load GB/s per transfer path, and a tier hit's TTFT against recompute.

Owns the docs PNG of the tier. Left panel, from one or more ``kv_transfer_micro.py`` JSONs (comma-separated):
GB/s (median of the repeats) against loader threads, one line per variant and destination layout at the chunk
size the tier uses (``--chunk-mib``).
Right panel, from a ``kv_tier_h200.py`` JSON: TTFT of the prefix recomputed and loaded from the tier
(every round as a dot, the median as a bar).
Third panel, with ``--e2e`` (a ``kv_tier_e2e.py`` JSON): TTFT p50 and output tok/s of every run, tier off vs
on, in run order.

Usage: python benchmarks/gpu/plot_kv_tier.py MICRO.json[,MICRO2.json] TIER.json OUT.png [--chunk-mib 32] \
           [--e2e E2E.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("micro")
    p.add_argument("tier")
    p.add_argument("out")
    p.add_argument("--chunk-mib", type=float, default=32.0)
    p.add_argument("--e2e", help="a kv_tier_e2e.py JSON: a third panel with its runs")
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    micros = [json.loads(Path(f).read_text()) for f in a.micro.split(",")]
    micro = micros[0]
    tier = json.loads(Path(a.tier).read_text())
    e2e = json.loads(Path(a.e2e).read_text()) if a.e2e else None
    fig, axes = plt.subplots(1, 3 if e2e else 2, figsize=(16.5 if e2e else 11, 4.2))
    left, right = axes[0], axes[1]
    cells = [(c["variant"] + ("" if m.get("dst", "random") == "random" else f" ({m['dst']})"), c)
             for m in micros for c in m["cells"] if abs(c["chunk_mib"] - a.chunk_mib) < 0.5]
    for label in dict.fromkeys(name for name, _ in cells):
        pts = sorted((c["threads"], c["gbps_median"]) for name, c in cells if name == label)
        left.plot([t for t, _ in pts], [g for _, g in pts], marker="o", label=label)
    left.set_xlabel("loader threads")
    left.set_ylabel("GB/s (object store -> paged GPU cache)")
    left.set_title(f"transfer paths, {a.chunk_mib:g} MiB chunks ({micro['machine'].get('gpu', '')})", fontsize=9)
    left.set_xscale("log", base=2)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    names = [("recompute", "ttft_recompute_ms"), ("tier hit", "ttft_tier_hit_ms")]
    for i, (label, key) in enumerate(names):
        right.bar(i, tier[key], color=["#999999", "#2b7bba"][i], width=0.6)
        right.scatter([i] * len(tier.get(f"{key}_all", [])), tier.get(f"{key}_all", []), color="k", s=10, zorder=3)
        right.text(i, tier[key], f"{tier[key]:.0f} ms", ha="center", va="bottom", fontsize=9)
    right.set_xticks(range(len(names)), [n for n, _ in names])
    right.set_ylabel("TTFT (ms)")
    right.set_title(f"{tier.get('prefix_tokens')}-token prefix: ratio {tier.get('ttft_ratio')}, "
                    f"load {tier.get('effective_load_gbps')} GB/s", fontsize=9)
    if e2e:
        e2e_panel(axes[2], e2e)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)


def e2e_panel(ax, e2e: dict) -> None:
    """TTFT p50 bars per run (tier off grey, on blue) with output tok/s on a second axis."""
    runs = e2e["runs"]
    colors = ["#2b7bba" if r["system"] == "tier_on" else "#999999" for r in runs]
    ttft = [r["bench"]["ttft_p50_ms"] for r in runs]
    ax.bar(range(len(runs)), ttft, color=colors, width=0.6)
    for i, v in enumerate(ttft):
        ax.text(i, v, f"{v:.0f} ms", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(runs)), [f"{r['system'].replace('tier_', '')} {r['run']}" for r in runs])
    ax.set_ylabel("TTFT p50 (ms, bars)")
    tps = ax.twinx()
    tps.plot(range(len(runs)), [r["bench"]["output_tok_per_s"] for r in runs], "ko-", ms=4)
    tps.set_ylabel("output tok/s (dots)")
    tps.set_ylim(bottom=0)
    ax.set_title(f"end to end, scale {e2e.get('scale')}: TTFT p50 {e2e.get('e2e_ttft_p50_ratio')}x, "
                 f"throughput {e2e.get('e2e_throughput_ratio')}x", fontsize=9)


if __name__ == "__main__":
    main()
