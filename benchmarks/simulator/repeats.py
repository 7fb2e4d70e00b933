"""GPU cells measured more than once: each compared at its median run.

Owns ``with_repeats``: a routing result's modelled cells (``routing_cells.gpu_cells``) joined with the same cells
in other results of the same scale, config and GPU (the calibration's cells run once more: ``routing_h2h.run --plan
again``). A cell with copies is represented by its median copy by TTFT p50 (``statistics.median_low``: a measured
run, never an average of two; with an even count the lower of the two middle ones), and carries every copy's TTFT
p50 in ``Cell.runs_ttft_p50_ms`` for the residual table. A copy whose load differs from the cell's (mode, level,
duration, session width: another calibration's rate), or a result of another scale, config or GPU, is an error, not
a silent second cell.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable

from benchmarks.simulator.routing_cells import Cell, gpu_cells


def _key(cell: Cell) -> tuple[str, str, str]:
    return cell.name, cell.workload, cell.load


def _same_load(a: Cell, b: Cell) -> bool:
    return (a.mode, a.level, a.duration_s, a.width, a.ingresses) == (b.mode, b.level, b.duration_s, b.width,
                                                                      b.ingresses)


def with_repeats(doc: dict, repeats: Iterable[tuple[str, dict]]) -> list[Cell]:
    """``doc``'s modelled cells, each replaced by its median copy over ``doc`` and ``repeats`` ((name, result)
    pairs); a repeated cell that ``doc`` lacks is not added (the main result says which cells there are)."""
    cells = gpu_cells(doc)
    copies: dict[tuple[str, str, str], list[Cell]] = {_key(c): [c] for c in cells}
    for name, other in repeats:
        for field in ("scale", "config"):
            if other.get(field) != doc.get(field):
                raise ValueError(f"{name}: {field} {other.get(field)!r}, the routing result's is {doc.get(field)!r}")
        gpus, ours = (other.get("machine") or {}).get("gpus"), (doc.get("machine") or {}).get("gpus")
        if gpus != ours:
            raise ValueError(f"{name}: ran on {gpus}, the routing result on {ours}: another machine's numbers")
        for copy in gpu_cells(other):
            if _key(copy) not in copies:
                continue
            first = copies[_key(copy)][0]
            if not _same_load(first, copy):
                raise ValueError(f"{name}: {'/'.join(_key(copy))} ran {copy.mode} {copy.level:g} for "
                                 f"{copy.duration_s:g} s (width {copy.width}), the routing result's {first.mode} "
                                 f"{first.level:g} for {first.duration_s:g} s (width {first.width})")
            copies[_key(copy)].append(copy)
    out = []
    for cell in cells:
        runs = copies[_key(cell)]
        p50s = [c.measured["ttft_p50_ms"] for c in runs]
        median = runs[p50s.index(statistics.median_low(p50s))]
        out.append(dataclasses.replace(median, runs_ttft_p50_ms=tuple(p50s)) if len(runs) > 1 else cell)
    return out
