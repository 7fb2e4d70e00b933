"""Registry of the benchmark workloads.

Owns ``WORKLOADS`` (name -> class) and ``make_workload``. Each workload lives in its own module and
is deterministic from its seed; see ``benchmarks.bench.spec`` for the contract.
"""

from __future__ import annotations

from benchmarks.bench.spec import Workload
from benchmarks.bench.workloads.docqa import DocQAWorkload
from benchmarks.bench.workloads.mooncake import MooncakeWorkload
from benchmarks.bench.workloads.multiturn import MultiTurnWorkload
from benchmarks.bench.workloads.synthetic import RandomWorkload

WORKLOADS: dict[str, type] = {
    "random": RandomWorkload,
    "docqa": DocQAWorkload,
    "multiturn": MultiTurnWorkload,
    "mooncake": MooncakeWorkload,
}


def make_workload(name: str, **params) -> Workload:
    """Build workload ``name`` from keyword parameters; unknown names raise ``ValueError``."""
    try:
        cls = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}") from None
    return cls(**params)


__all__ = ["WORKLOADS", "DocQAWorkload", "MooncakeWorkload", "MultiTurnWorkload", "RandomWorkload", "make_workload"]
