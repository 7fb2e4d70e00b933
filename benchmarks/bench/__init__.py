"""kvserve's HTTP benchmark: a load generator for any OpenAI-compatible endpoint.

Owns the ``kvserve bench`` tool. It talks to the service over HTTP only (ours, ``vllm serve``,
Ray Serve LLM) and never imports the serving code.

Layout (one topic per module):
    spec.py        BenchRequest / Session / Workload: what a workload hands the load generator.
    tokens.py      deterministic token ids and text from (seed, key).
    workloads/     random, docqa, multiturn, mooncake generators and their registry.
    client.py      one streaming request -> one RequestRecord (TTFT, ITL, usage, errors).
    pool.py        SessionPool: sessions interleaved round-robin, the source of every next request.
    loadgen.py     closed-loop concurrency, open-loop Poisson and trace-replay schedulers.
    split.py       one run's load cut into per-process parts, and their records merged back.
    procs.py       ``--processes N``: the parts run in N spawned client processes.
    stats.py       percentiles and the run summary.
    result.py      the result JSON (config, machine, summary, samples).
    cost.py        cost per 1K input/output tokens from a GPU-hour price.
    compare.py     several result JSONs -> PNG plots and a markdown table.
    command.py     ``kvserve bench``: flags -> workload + LoadSpec, preflight, run, exit codes.

Usage and metric definitions: README.md next to this file.
"""

from benchmarks.bench.spec import BenchRequest, Session, Workload

__all__ = ["BenchRequest", "Session", "Workload"]
