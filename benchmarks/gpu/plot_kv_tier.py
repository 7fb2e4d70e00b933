"""The KV tier's GPU figures as one PNG: load GB/s per transfer path, and a tier hit's TTFT against recompute.

Owns the docs PNG of the tier. Left panel, from one or more ``kv_transfer_micro.py`` JSONs (comma-separated):
GB/s (median of the repeats) against loader threads, one line per variant and destination layout at the chunk
size the tier uses (``--chunk-mib``).
Right panel, from a ``kv_tier_h200.py`` JSON: TTFT of the prefix recomputed and loaded from the tier
(every round as a dot, the median as a bar).

Usage: python benchmarks/gpu/plot_kv_tier.py MICRO.json[,MICRO2.json] TIER.json OUT.png [--chunk-mib 32]
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
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    micros = [json.loads(Path(f).read_text()) for f in a.micro.split(",")]
    micro = micros[0]
    tier = json.loads(Path(a.tier).read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
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
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)


if __name__ == "__main__":
    main()
