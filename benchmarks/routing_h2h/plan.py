"""The device plan: the matrix cut into calls that each fit one device call, as commands to paste.

Owns ``Call``, ``pack``, ``summary_cells``, ``current_cells`` (what ``--plan-missing`` leaves out), ``again_cells``
(what ``--plan again`` runs once more), ``commands`` and ``render`` (the calls as text). A call is one ``serve run``
of one system over some of its cells (workload x load), merged with ``--merge`` into one result: a copy of ``KEPT``
or of the committed result given (``device_out``). Its estimate is
``START_S`` (4 x 1B engines on a warm machine: 113-126 s at 54d8ff8) + ``STOP_S`` + per cell ``duration_s +
CELL_OVERHEAD_S`` (warm-up requests, the drain of those in flight, the metric scrapes), plus ``COLD_EXTRA_S`` for the
very first call (a fresh machine compiles: 316 s to ready at 54d8ff8; the wheels' install, ~40 s, runs before
the call's limit). Cells of a system are packed in order into calls whose estimate stays within ``limit_s``;
round-robin goes first, since its ``sat`` cells calibrate the arrival rates of every lighter load.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from benchmarks.routing_h2h.summary import (
    DEFAULT_STRATEGY,
    RAY_ROUTER,
    ROUND_ROBIN,
    SHARED_PREFIX,
    TWO_INGRESS,
    TWO_INGRESS_WORKLOADS,
)

START_S = 130.0
STOP_S = 15.0
CELL_OVERHEAD_S = 13.0  # + 3 s: the evidence's scrape after each cell waits for Ray's agent to export
COLD_EXTRA_S = 190.0
LIMIT_S = 560
KEPT = "benchmarks/results/routing_h200.json"  # the committed result a plan's calls merge into, by default
TRACE = ".carry/mooncake/conversation_trace.jsonl"
CARRY = [".carry", ".models/shape-llama-3.2-1b"]
CONFIG = "configs/gpu-routing.yaml"
BASE_ARGS = ["--config", CONFIG, "--scale", "gpu", "--fast-path", "--ray-stop",
             "--trace-file", TRACE, "--work-dir", "/tmp/res/work/routing_h2h", "--start-timeout", "360", "--merge"]

Cell = tuple[str, str]  # (workload, level)

# What a cell's numbers depend on: the serving code and the load generator (not the KubeRay manifests); Ray's
# systems also run the head-to-head's adapter of its router
MEASURED_PATHS = ("deployments", "routers", "serve_app", ":(exclude)serve_app/kuberay", CONFIG, "benchmarks/bench",
                  "benchmarks/cli.py")
RAY_ADAPTER = "benchmarks/routing_h2h/ray_router.py"
#: requests per replica in a first cell's first evidence interval above which an idle replica means it was not running
LATE_MIN_REQUESTS = 4
#: Commits that changed a measured path without changing what any finished cell measured, and why: a cell measured
#: before them stays current when they are the only such commits since (``run.same_code``)
NEUTRAL_COMMITS = {
    "8038cd6140db0bc2f51026b06aeb245d4158f62e": "bench: the open loop's drain after the last request (Python 3.12's "
                                                "eager gather made it spin once every session had ended); a cell "
                                                "that finished never reached that state",
}


def measured_paths(system: str) -> tuple[str, ...]:
    """The paths whose code a ``system``'s cells measured."""
    return (*MEASURED_PATHS, RAY_ADAPTER) if system.startswith(RAY_ROUTER) else MEASURED_PATHS


@dataclass
class Call:
    """One device call: one system, some of its cells, the estimated seconds."""

    system: str
    cells: list[Cell] = field(default_factory=list)
    estimate_s: float = 0.0


def pack(cells_by_system: dict[str, list[Cell]], duration_s: float, limit_s: float = LIMIT_S) -> list[Call]:
    """Calls in system order, each estimated within ``limit_s``; raises if one cell alone does not fit."""
    cell_s = duration_s + CELL_OVERHEAD_S
    calls: list[Call] = []
    for system, cells in cells_by_system.items():
        call = None
        for cell in cells:
            if call is None or call.estimate_s + cell_s > limit_s:
                fixed = START_S + STOP_S + (COLD_EXTRA_S if not calls else 0.0)
                if fixed + cell_s > limit_s:
                    raise ValueError(f"one {duration_s:g} s cell does not fit a {limit_s:g} s call")
                call = Call(system, [], fixed)
                calls.append(call)
            call.cells.append(cell)
            call.estimate_s += cell_s
    return calls


def summary_cells(levels: list[str], ingress_variant: str = TWO_INGRESS) -> dict[str, list[Cell]]:
    """Only the cells the summary's keys read: shared-prefix workloads at ``sat`` (round-robin, the default
    strategy, Ray's router), no-sharing at every level (round-robin, default), and the default strategy at the
    other ingress count (``ingress_variant``) at ``sat``."""
    sat = [(wl, "sat") for wl in SHARED_PREFIX]
    no_sharing = [("no-sharing", lv) for lv in levels]
    return {ROUND_ROBIN: sat + no_sharing, DEFAULT_STRATEGY: sat + no_sharing, RAY_ROUTER: sat,
            ingress_variant: [(wl, "sat") for wl in TWO_INGRESS_WORKLOADS]}


def again_cells(doc: dict, systems: Iterable[str], selected: Iterable[Cell]) -> dict[str, list[Cell]]:
    """The cells of ``systems`` that a result ``doc`` holds at a closed-loop or Poisson load (a trace replay is
    left out: the simulator's calibration compares the others), among ``selected``, in the order its last run of
    each system finished them (Ray's router keeps its tree from one cell to the next), the others after: what
    ``--plan again`` runs once more."""
    wanted, out = set(selected), {}
    for system in systems:
        res = (doc.get("results") or {}).get(system) or {}
        held = [(wl, lv) for wl, levels in res.items() if isinstance(levels, dict)
                for lv, m in levels.items() if isinstance(m, dict) and "ttft_p50_ms" in m
                and (m.get("load") or {}).get("mode") in ("concurrency", "rate") and (wl, lv) in wanted]
        order = [tuple(k.split(":", 1)) for run in res.get("runs") or [] for k in finished(run)]
        rank = {cell: i for i, cell in enumerate(order)}  # a cell's last run decides its place
        if held:
            out[system] = sorted(held, key=lambda c: rank.get(c, len(order)))
    return out


def finished(run: dict) -> list[str]:
    """The ``workload:level`` cells a run of ``run_system`` finished, in order: its ``done``, fewer than its ``cells``
    when a call's limit cut it; a run written before ``done`` existed counts the ``cells`` it started with."""
    return run.get("done", run.get("cells") or [])


def current_cells(doc: dict, system: str, same_code: Callable[[str, tuple[str, ...]], bool]) -> set[Cell]:
    """The cells of ``system`` in a result ``doc`` whose last run measured the code that is here now: ``same_code(sha,
    paths)`` says whether commit ``sha`` had today's ``paths`` (``measured_paths``). A run's cells are those it
    ``finished``, and a cell the result does not hold, or holds as an ``error`` (a bench that failed or was cut), is
    never current. A cell whose run names no commit, or ``started_late``, is not current."""
    res = doc.get("results", {}).get(system, {})
    runs, late = res.get("runs", []), late_cells(res)
    last = {cell: None if cell in late else runs[i].get("git_commit") for cell, i in last_runs(res).items()}
    held = {cell for cell in last if isinstance(m := (res.get(cell[0]) or {}).get(cell[1]), dict) and "error" not in m}
    paths = measured_paths(system)
    same = {sha: same_code(sha, paths) for sha in {last[c] for c in held} if sha}  # one comparison per commit
    return {cell for cell in held if last[cell] and same[last[cell]]}


def started_late(res: dict, run: dict, later: Sequence[dict] = ()) -> bool:
    """Whether ``run`` began its first cell before every replica served: a run without a successful wait for Serve to
    report every replica running (no ``replicas_ready``, from before ``run_system`` waited, or one holding an
    ``error``) whose first cell's evidence timeline shows a replica
    without a request in the first interval while the cell sent at least ``LATE_MIN_REQUESTS`` per replica there
    (fewer can leave a replica idle by chance). All of such a run's cells count as not current: what the routers
    learnt while a replica was missing (Ray's tree and its tenants' sizes, the strategies' indexes and the engines'
    caches) carries into the later cells. A run's ``started_late`` recorded when a later run replaced its first cell
    (``judge_replaced``) is the answer; without one, a first cell that a ``later`` run measured again cannot be judged:
    no."""
    if "started_late" in run:
        return bool(run["started_late"])
    done = finished(run)
    waited = "error" not in run.get("replicas_ready", {"error": "none"})
    if waited or not done or any(done[0] in finished(r) for r in later):
        return False
    wl, _, lv = done[0].partition(":")
    timeline = (((res.get(wl) or {}).get(lv) or {}).get("evidence") or {}).get("timeline") or []
    if not timeline:
        return False
    replicas = set().union(*(point.get("requests", {}) for point in timeline))
    first = timeline[0].get("requests", {})
    idle = [r for r in replicas if not first.get(r)]
    return bool(idle) and sum(first.values()) >= LATE_MIN_REQUESTS * len(replicas)


def judge_replaced(res: dict, replaced: Iterable[str]) -> list[dict]:
    """``res``'s runs, where a run whose first cell (``WORKLOAD:LEVEL``) is in ``replaced`` and still holds that cell's
    evidence comes back a copy with ``started_late`` recorded: judged now, before the cell's new run replaces the
    timeline it is judged by."""
    runs, holder = res.get("runs", []), last_runs(res)
    out = []
    for i, run in enumerate(runs):
        done = finished(run)
        if done and done[0] in replaced and "started_late" not in run:
            wl, _, lv = done[0].partition(":")
            if holder.get((wl, lv)) == i:
                run = {**run, "started_late": started_late(res, run)}
        out.append(run)
    return out


def last_runs(res: dict) -> dict[Cell, int]:
    """Each cell one system's result ``res`` has a run for -> the index in its ``runs`` of the last that ``finished``
    it."""
    last: dict[Cell, int] = {}
    for i, run in enumerate(res.get("runs", [])):
        for cell in finished(run):
            wl, _, lv = cell.partition(":")
            last[(wl, lv)] = i
    return last


def late_cells(res: dict) -> set[Cell]:
    """The cells of one system's result ``res`` whose last run ``started_late``."""
    runs = res.get("runs", [])
    last = last_runs(res)
    late = {i for i in set(last.values()) if started_late(res, runs[i], later=runs[i + 1:])}
    return {cell for cell, i in last.items() if i in late}


def selection_args(cells: list[Cell]) -> list[str]:
    """``--workloads`` and ``--loads`` naming exactly ``cells``."""
    by_wl: dict[str, list[str]] = {}
    for wl, lv in cells:
        by_wl.setdefault(wl, []).append(lv)
    shapes = {tuple(lvs) for lvs in by_wl.values()}
    loads = ",".join(shapes.pop()) if len(shapes) == 1 else ",".join(f"{wl}:{lv}" for wl, lv in cells)
    return ["--workloads", ",".join(by_wl), "--loads", loads]


def device_out(kept: str) -> str:
    """Where a call writes on the device: ``/tmp/res/`` and the kept result's file name."""
    return f"/tmp/res/{PurePosixPath(kept).name}"


def commands(calls: list[Call], duration_s: float, limit_s: int = LIMIT_S, git_commit: str = "SHA",
             extra: tuple[str, ...] = (), kept: str = KEPT) -> list[str]:
    """One shell line per call for the device (``run`` with ``carry=CARRY``): seed the kept result (``kept``, a
    committed JSON of the same scale and config) when the machine is fresh, then ``run_on_device.sh`` (which returns
    /tmp/res/*.json and the logs); ``extra`` flags go to every call (e.g. ``--client-processes 2``)."""
    out, dest = [], device_out(kept)
    for call in calls:
        args = [*BASE_ARGS, "--out", dest, "--git-commit", git_commit, "--duration", f"{duration_s:g}",
                "--systems", call.system, *selection_args(call.cells), *extra]
        out.append(f"mkdir -p /tmp/res && {{ [ -f {dest} ] || cp {kept} /tmp/res/ 2>/dev/null; }}; "
                   f"bash benchmarks/gpu/run_on_device.sh {limit_s} -m benchmarks.routing_h2h.run {shlex.join(args)}")
    return out


def render(calls: list[Call], duration_s: float, limit_s: int = LIMIT_S, git_commit: str = "SHA",
           extra: tuple[str, ...] = (), kept: str = KEPT) -> str:
    """The plan as text: per call its system, cells and estimate, then the command; the total last."""
    head = (f"# device plan: {len(calls)} calls, cells of {duration_s:g} s, run(carry={CARRY}); after each call "
            f"copy the returned {PurePosixPath(kept).name} to {kept} (a fresh machine starts from it)")
    install = ("# first, in the call right after the last wheel part, install alone (about 40 s, outside any limit): "
               "bash benchmarks/gpu/run_on_device.sh 30 -c pass")
    caches = ("# engine caches (run_on_device.sh): a fresh machine's first engine start reuses vLLM's compile and the "
              "JIT caches of .carry/engine-caches.tgz; write KVSERVE_SAVE_ENGINE_CACHES=1 before `bash` in call 1 "
              "and copy the engine-caches.tgz it returns to .carry/ (an engine start that ran to the end has them all)")
    lines = [head, install, caches]
    for i, (call, cmd) in enumerate(zip(calls, commands(calls, duration_s, limit_s, git_commit, extra, kept),
                                        strict=True), 1):
        cells = " ".join(f"{wl}:{lv}" for wl, lv in call.cells)
        lines += [f"# {i}. {call.system}: {cells} (~{call.estimate_s:.0f} s)", cmd]
    lines.append(f"# total ~{sum(c.estimate_s for c in calls):.0f} s of device time")
    return "\n".join(lines) + "\n"
