"""vLLM's engine steps, one by one, from its iteration log: how long the engine core waited for each step, split
by whether the step carried a prefill.

Owns ``parse`` (vLLM's ``Iteration(N): ...`` lines, which its default stat logger writes for every step when the
engine runs with ``enable_logging_iteration_details``) and ``summarise`` (per kind of step: count, mean and
percentiles of the core's wait, and of the prefill steps' context tokens; the prefill steps' wait again split by
whether the step scheduled at most ``graph_tokens`` tokens, the size up to which vLLM runs a mixed step from captured
(piecewise) CUDA graphs), with a CLI over the replicas' worker
logs (``/tmp/ray/session_*/logs/worker-*.out``; one file per Serve replica)::

    python -m benchmarks.routing_h2h.steps worker-*.out [--from HH:MM:SS --to HH:MM:SS] [--graph-tokens N] [--out F]

``routing_h2h.run --steps`` does it per cell: its engines run with ``ENGINE_KWARGS``, each cell's seconds are
noted (``clock``), and before the system stops ``collect`` keeps the iteration lines of the replicas' worker logs
(``RAY_LOGS``) in one gzip beside the server log, summarised per cell into its evidence.

"iteration elapsed time" is the engine core's wait for that step's output (``EngineCore.capture_iteration_details``
around the step's future), after it scheduled and launched the next step under asynchronous scheduling: a step
that runs longer on the GPU shows as a longer wait. The log's timestamps have whole seconds, which is all the
``--from``/``--to`` window (a cell's measured phase) needs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench.stats import percentile

_LINE = re.compile(
    r"(?P<clock>\d\d:\d\d:\d\d)\S* \[[^\]]*\] Engine (?P<engine>\d+): Iteration\((?P<index>\d+)\): "
    r"(?P<ctx_reqs>\d+) context requests, (?P<ctx_tokens>\d+) context tokens, (?P<gen_reqs>\d+) generation requests, "
    r"(?P<gen_tokens>\d+) generation tokens, iteration elapsed time: (?P<ms>[\d.]+) ms(?P<dummy> \(dummy\))?")


#: vLLM's default ``max_cudagraph_capture_size`` (0.26: ``FULL_AND_PIECEWISE`` graphs up to 512 tokens, as the GPU
#: engines' start lines say): a step scheduling at most this many tokens, prefill included, replays captured graphs
#: (piecewise for a mixed step: its attention runs outside them).
GRAPH_TOKENS = 512
#: The engine argument that makes vLLM log every step (``--steps``).
ENGINE_KWARGS = {"enable_logging_iteration_details": True}
#: Where Serve starts with ``--fast-path`` (``RAY_SERVE_THROUGHPUT_OPTIMIZED``), a replica's stdout, vLLM's log lines
#: with it, goes to Serve's own buffered replica log instead of the worker's: ``--steps`` keeps it on the worker's.
SERVER_ENV = {"RAY_SERVE_LOG_TO_STDERR": "1"}
#: Where a Serve replica's stdout lands on the machine running Ray (one ``worker-*.out`` per worker process).
RAY_LOGS = Path("/tmp/ray/session_latest/logs")


@dataclass(frozen=True, slots=True)
class Step:
    source: str  # the log (one replica's worker) it came from
    clock: str  # HH:MM:SS of the line
    index: int
    ctx_reqs: int
    ctx_tokens: int
    gen_reqs: int
    elapsed_ms: float
    gen_tokens: int = 0

    @property
    def prefill(self) -> bool:
        return self.ctx_tokens > 0

    @property
    def tokens(self) -> int:
        """What the step scheduled: its prefill chunks' tokens and its decodes' tokens."""
        return self.ctx_tokens + self.gen_tokens


def parse(lines, source: str = "") -> list[Step]:
    """The non-dummy iteration lines among ``lines``; anything else is skipped."""
    out = []
    for line in lines:
        m = _LINE.search(line)
        if m is None or m["dummy"]:
            continue
        out.append(Step(source, m["clock"], int(m["index"]), int(m["ctx_reqs"]), int(m["ctx_tokens"]),
                        int(m["gen_reqs"]), float(m["ms"]), int(m["gen_tokens"])))
    return out


def _dist(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    return {"n": len(xs), "mean": round(statistics.fmean(xs), 2),
            **{f"p{q}": round(percentile(xs, q), 2) for q in (10, 50, 90, 99)}}


def summarise(steps: list[Step], start: str | None = None, end: str | None = None,
              graph_tokens: int = GRAPH_TOKENS) -> dict:
    """Per kind of step (``prefill``: carried context tokens; ``decode``: did not) the core's wait in ms, the
    prefill steps' wait again by their scheduled tokens (``prefill_in_graph``: at most ``graph_tokens``;
    ``prefill_over_graph``: more), the prefill steps' context tokens and requests, and the share of steps that carried
    a prefill; only steps whose line's clock is within [``start``, ``end``] (HH:MM:SS, inclusive) when given."""
    steps = [s for s in steps if (start is None or s.clock >= start) and (end is None or s.clock <= end)]
    pre = [s for s in steps if s.prefill]
    dec = [s for s in steps if not s.prefill]
    return {
        "steps": len(steps),
        "sources": len({s.source for s in steps}),
        "prefill_share": round(len(pre) / len(steps), 4) if steps else None,
        "wait_ms": {"prefill": _dist([s.elapsed_ms for s in pre]), "decode": _dist([s.elapsed_ms for s in dec]),
                    "prefill_in_graph": _dist([s.elapsed_ms for s in pre if s.tokens <= graph_tokens]),
                    "prefill_over_graph": _dist([s.elapsed_ms for s in pre if s.tokens > graph_tokens])},
        "graph_tokens": graph_tokens,
        "prefill_ctx_tokens": _dist([float(s.ctx_tokens) for s in pre]),
        "prefill_ctx_reqs": _dist([float(s.ctx_reqs) for s in pre]),
        "decode_batch": _dist([float(s.gen_reqs) for s in dec]),
        "window": [start, end],
    }


def clock() -> str:
    """This machine's wall clock as the log lines stamp it (local time, whole seconds)."""
    return time.strftime("%H:%M:%S")


def collect(log_dir: Path, dest: Path) -> list[Step]:
    """The iteration lines of every ``worker-*.out`` under ``log_dir``, written to ``dest`` (gzip, one file for all
    workers, each line prefixed with its worker's file name) and parsed; [] when there are none."""
    steps, kept = [], []
    for path in sorted(log_dir.glob("worker-*.out")):
        with _open(path) as f:
            lines = [line for line in f if "Iteration(" in line]
        steps += parse(lines, path.name)
        kept += [f"{path.name}: {line}" for line in lines]
    if kept:
        with gzip.open(dest, "wt") as out:
            out.writelines(kept)
    return steps


def _open(path: Path):
    return gzip.open(path, "rt", errors="replace") if path.suffix == ".gz" else path.open(errors="replace")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.routing_h2h.steps", description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", type=Path, help="worker logs (.out, or .gz) with vLLM's iteration lines")
    ap.add_argument("--from", dest="start", help="first second (HH:MM:SS) of the window")
    ap.add_argument("--to", dest="end", help="last second (HH:MM:SS) of the window")
    ap.add_argument("--graph-tokens", type=int, default=GRAPH_TOKENS,
                    help=f"split the prefill steps at this many scheduled tokens (vLLM's CUDA-graph size; "
                         f"default {GRAPH_TOKENS})")
    ap.add_argument("--out", type=Path, help="write the summary here as JSON")
    args = ap.parse_args(argv)
    if args.graph_tokens < 0:
        ap.error(f"--graph-tokens must be >= 0, got {args.graph_tokens}")
    steps = []
    for path in args.logs:
        with _open(path) as f:
            steps += parse(f, path.name)
    if not steps:
        print("no vLLM iteration lines in the logs (was enable_logging_iteration_details set?)", file=sys.stderr)
        return 1
    doc = summarise(steps, args.start, args.end, args.graph_tokens)
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
