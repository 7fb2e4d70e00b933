"""How long a full garbage collection stalls a serving process, before and after its startup heap is frozen.

A replica or ingress process imports vLLM, torch, transformers and Ray Serve; every full collection walks
those objects on the thread that triggered it (the asyncio loop that streams tokens). This imports what
``deployments/vllm_replica.py`` and ``deployments/ingress.py`` import, counts the objects the collector
tracks, times ``gc.collect(2)`` ``--rounds`` times, calls ``deployments.heap.freeze_startup_heap`` (what both
deployments do once started) and times it again. No engine is started (its allocations add to the heap;
the figure here is a floor).

Usage: ``python -m benchmarks.gc_pause [--rounds N] [--out PATH]`` (default
benchmarks/results/gc_pause_cpu.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import time
from pathlib import Path


def _collect_ms(rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        gc.collect(2)
        out.append(round((time.perf_counter() - t0) * 1000, 2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/gc_pause_cpu.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    # what the two deployments import, and the engine class the replica builds
    from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401

    import deployments.ingress
    import deployments.vllm_replica  # noqa: F401
    from benchmarks.bench.result import git_commit, machine_info
    from deployments.heap import freeze_startup_heap

    import_s = time.perf_counter() - t0
    tracked = len(gc.get_objects())
    before = _collect_ms(args.rounds)
    frozen = freeze_startup_heap("gc_pause")
    after = _collect_ms(args.rounds)
    doc = {
        "command": shlex.join(["python", "-m", "benchmarks.gc_pause", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(), "git_commit": git_commit(),
        "import_s": round(import_s, 1), "tracked_objects": tracked, "frozen_objects": frozen,
        "full_collection_ms_before_freeze": before, "full_collection_ms_after_freeze": after,
        "median_ms_before": statistics.median(before), "median_ms_after": statistics.median(after),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
