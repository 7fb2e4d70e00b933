"""``kvserve bench --compare``: several result JSONs -> PNG plots and a markdown table.

Owns ``load_results``, ``markdown_table``, ``plot_ttft_cdf``, ``plot_ttft_vs_load`` and
``compare_files``. Results are grouped into series by (label, workload): the label names the system
(``--label``), so one series is one system on one workload across load levels. matplotlib is
imported lazily, only when plotting (``pip install matplotlib``, or the project's ``bench`` extra).

Outputs in the plot folder: ``ttft_cdf.png`` (one CDF per result), ``ttft_p50_vs_load.png`` (one
line per series; x is concurrency or request rate, or achieved requests/s for trace replay) and
``table.md`` (also printed).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from benchmarks.bench.result import SCHEMA

logger = logging.getLogger(__name__)


def load_results(paths: list[Path]) -> list[dict]:
    """Read result JSONs; a missing file or another schema raises ``ValueError`` naming the file."""
    results = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ValueError(f"{path} is not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ValueError(f"{path} is not a kvserve bench result (schema {SCHEMA})")
        results.append(data)
    return results


def load_x(result: dict) -> float:
    """The x coordinate of a result on a load axis."""
    load = result["config"]["load"]
    return load["level"] if load["mode"] != "trace" else result["headline"]["requests_per_s"]


def run_name(result: dict) -> str:
    load = result["config"]["load"]
    level = "trace" if load["mode"] == "trace" else f"{load['mode'][0]}={load['level']:g}"
    return f"{result['label']} {result['config']['workload']['name']} {level}"


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(results: list[dict]) -> str:
    """One row per result, sorted by system, workload and load."""
    header = ("| system | workload | load | done | errors | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | ITL p50 ms "
              "| E2E p50 ms | out tok/s | req/s | cache hit |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    ordered = sorted(results, key=lambda r: (r["label"], r["config"]["workload"]["name"],
                                             r["config"]["load"]["mode"], load_x(r)))
    for r in ordered:
        h, load = r["headline"], r["config"]["load"]
        level = ("trace" if load["mode"] == "trace"
                 else f"{'c' if load['mode'] == 'concurrency' else 'rate '}{load['level']:g}")
        hit = "-" if h["cache_hit_rate"] is None else f"{h['cache_hit_rate']:.1%}"
        lines.append(f"| {r['label']} | {r['config']['workload']['name']} | {level} | {h['completed']} | {h['errors']} "
                     f"| {_fmt(h['ttft_p50_ms'])} | {_fmt(h['ttft_p90_ms'])} | {_fmt(h['ttft_p99_ms'])} "
                     f"| {_fmt(h['itl_p50_ms'], '.2f')} | {_fmt(h['e2e_p50_ms'])} | {h['output_tok_per_s']:.1f} "
                     f"| {h['requests_per_s']:.2f} | {hit} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install matplotlib (or the 'bench' extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ttft_cdf(results: list[dict], path: Path) -> None:
    """Empirical TTFT CDF per result (log-scaled x)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        values = sorted(r["samples"]["ttft_ms"])
        if values:
            n = len(values)
            ax.step(values, [(i + 1) / n for i in range(n)], where="post", label=run_name(r))
    ax.set_xscale("log")
    from matplotlib.ticker import ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ttft_vs_load(results: list[dict], path: Path) -> None:
    """TTFT p50 against load, one line per (system, workload, load mode)."""
    plt = _pyplot()
    series: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in results:
        p50 = r["headline"]["ttft_p50_ms"]
        if p50 is not None:
            key = (r["label"], r["config"]["workload"]["name"], r["config"]["load"]["mode"])
            series[key].append((load_x(r), p50))
    fig, ax = plt.subplots(figsize=(8, 5))
    for (label, workload, mode), points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{label} {workload} ({mode})")
    modes = {key[2] for key in series}
    ax.set_xlabel("concurrency" if modes == {"concurrency"} else "requests/s" if modes <= {"rate", "trace"}
                  else "load (concurrency or requests/s)")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title("TTFT p50 vs load")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_files(paths: list[Path], out_dir: Path) -> int:
    """Write ``table.md`` and the two plots into ``out_dir``; print the table. Returns 0."""
    results = load_results(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    (out_dir / "table.md").write_text(table)
    print(table, end="")
    plot_ttft_cdf(results, out_dir / "ttft_cdf.png")
    plot_ttft_vs_load(results, out_dir / "ttft_p50_vs_load.png")
    print(f"wrote {out_dir / 'table.md'}, {out_dir / 'ttft_cdf.png'}, {out_dir / 'ttft_p50_vs_load.png'}")
    return 0
