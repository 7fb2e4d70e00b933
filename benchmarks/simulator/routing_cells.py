"""The routing head-to-head's cells in the simulator: which GPU cells it models, their simulation, the fit of the
engine's free fields to them, and how the simulated cells compare with the GPU's.

Owns ``Cell`` and ``gpu_cells`` (the cells of a ``kvserve.routing_h2h/1`` or ``/2`` JSON: per system, its strategy,
ingress count, the bench processes its load came from and the seed of its prompts), ``sessions_for`` (the twin of
``kvserve bench``'s workloads), ``simulate_cell`` (on the GPU cell's own prompts), ``fit`` (a multiplicative
coordinate search over the fields the cells can identify, within bounds), ``residuals`` with the engine stage's
parts (``engine_parts``), ``ordering`` (the strategies per workload and load, by pairs apart on the GPU) and the
markdown tables. ``calibrate.py`` decides what is free and from where the fit starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench.command import prompt_seed
from benchmarks.routing_h2h.plan import finished
from benchmarks.routing_h2h.summary import workload_names
from benchmarks.simulator import workloads
from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.load import LoadPlan, split_driver
from benchmarks.simulator.ray_twin import RAY_TWIN, RayTree
from benchmarks.simulator.sim import ClusterSpec, simulate, strategy_knobs
from deployments.stages import ENGINE_PARTS
from serve_app.settings import mooncake_trace

MODELLED = ("round-robin", "least-loaded", "prefix-aware", "kv-aware", RAY_TWIN)
FREE = ("prefill_attn_s", "gpu_contention")


@dataclass(frozen=True)
class Cell:
    strategy: str
    workload: str
    load: str
    mode: str
    level: float
    duration_s: float
    measured: dict
    system: str = ""  # the result's system name (schema /2: e.g. kv-aware-2ingress); "" = the strategy
    ingresses: int = 1
    width: int | None = None  # sessions open at once (the GPU run's session_width)
    #: the cells its GPU run measured before it on the same deployment, in order (Ray's twin only: its tree carries)
    before: tuple[Cell, ...] = ()
    #: the TTFT p50 of every GPU run of this cell when it ran more than once, ``measured`` being the median one
    #: (``repeats.with_repeats``); () for a cell measured once
    runs_ttft_p50_ms: tuple[float, ...] = ()
    #: replay the bench's processes (``load.split_driver``: each one's share, session shard and arrival stream)
    #: rather than one stream of the whole load
    split_load: bool = False

    @property
    def name(self) -> str:
        return self.system or self.strategy

    @property
    def _command(self) -> list[str]:
        """The GPU cell's bench command, split into its arguments."""
        return (self.measured.get("command") or "").split()

    @property
    def client_processes(self) -> int:
        """The bench processes the GPU cell's load came from (its command's ``--processes``; 1 without)."""
        return int(_opt(self._command, "--processes", "1"))

    @property
    def bench_seed(self) -> int:
        """The GPU cell's ``--seed`` (0 without): it seeds the bench's prompts and, with the cell's processes, its
        arrival streams."""
        return int(_opt(self._command, "--seed", "0"))

    @property
    def prompt_seed(self) -> int | str:
        """The seed of the GPU cell's prompts, by the bench's own rule (``--seed`` salted by ``--prompt-salt``,
        default the load level: ``0/c64``, ``0/r24.716``): the twin's sessions are then the GPU run's own
        (documents' lengths and picks, sessions' turn lengths)."""
        return prompt_seed(argparse.Namespace(
            seed=self.bench_seed, prompt_salt=_opt(self._command, "--prompt-salt", None),
            workload=self.workload, trace=None,
            concurrency=int(self.level) if self.mode == "concurrency" else None,
            rate=self.level if self.mode == "rate" else None))


def _opt(args: list[str], name: str, default: str | None) -> str | None:
    return args[args.index(name) + 1] if name in args else default


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def sessions_for(workload: str, args: list[str], block_size: int, seed: int | str = 0):
    """The simulator's twin of ``kvserve bench --workload ...`` with the GPU run's arguments (``args``
    name the bench's workload; the cell's name, e.g. ``no-sharing``, does not matter)."""
    workload = _opt(args, "--workload", workload)
    if workload == "docqa":
        return workloads.docqa_sessions(no_sharing="--no-sharing" in args, docs=int(_opt(args, "--docs", "4")),
                                        doc_tokens=_range(_opt(args, "--doc-tokens", "4096:8192")),
                                        question_tokens=_range(_opt(args, "--question-tokens", "32:64")),
                                        output_len=int(_opt(args, "--output-len", "64")),
                                        block_size=block_size, seed=seed)
    if workload == "multiturn":
        return workloads.multiturn_sessions(sessions=int(_opt(args, "--sessions", "64")),
                                            turns=int(_opt(args, "--turns", "8")),
                                            system_words=int(_opt(args, "--system-words", "512")),
                                            user_words=_range(_opt(args, "--user-words", "32:96")),
                                            output_len=int(_opt(args, "--output-len", "128")),
                                            block_size=block_size, seed=seed)
    if workload == "mooncake":
        if "--no-sharing" in args:
            raise ValueError("no simulator twin for mooncake --no-sharing")
        return iter(workloads.mooncake_sessions(
            Path(_opt(args, "--trace-file", str(mooncake_trace()))),
            block_tokens=int(_opt(args, "--block-tokens", "64")),
            max_input_tokens=int(_opt(args, "--max-input-tokens", "7000")),
            max_output_tokens=int(_opt(args, "--max-output-tokens", "256")), block_size=block_size, seed=seed))
    raise ValueError(f"no simulator twin for workload {workload!r}")


def _twin(workload: str, args: list[str]) -> bool:
    wl = _opt(args, "--workload", workload)
    return wl in ("docqa", "multiturn") or (
        wl == "mooncake" and "--no-sharing" not in args and mooncake_trace().exists())


def gpu_cells(doc: dict) -> list[Cell]:
    """Every cell of a routing head-to-head result that the simulator models.

    Schema /1: ``results[strategy][workload][level]``. Schema /2: ``results[system][workload][level]``,
    the system's strategy in its ``routing`` (or ``systems[name].routing``), its ingress count in
    ``ingress_replicas``; ``runs``, ``routing``, ``ingress_replicas`` are not workloads (``workload_names``).
    A system running Ray's router (``request_router_class`` ``...:RayPrefixCacheAffinity``) is simulated by
    its twin (``ray_twin.py``), unless its ``request_router_kwargs`` change Ray's defaults (a trace does not).
    Closed-loop (``concurrency``) and Poisson (``rate``) cells only: a timed trace replay is skipped.
    A twin cell's ``before`` holds the modelled cells its run (the last of ``runs`` that finished it,
    ``plan.finished``) measured before it: one deployment serves a run's cells in turn, and Ray's tree actor keeps
    what they routed.
    """
    out = []
    settings = doc.get("scale_settings", {}).get("workloads", {})
    for system, res in doc["results"].items():
        declared = doc.get("systems", {}).get(system, {})
        routing = {**(declared.get("routing") or {}), **(res.get("routing") or {})}
        strategy = routing.get("strategy") or system
        if routing.get("request_router_class", "").endswith(":RayPrefixCacheAffinity"):
            if set(routing.get("request_router_kwargs") or {}) - {"trace_dir"}:
                continue  # Ray's router set away from its defaults (a diagnostic system): the twin has the defaults
            strategy = RAY_TWIN  # Ray's router on token ids (benchmarks/routing_h2h/ray_router.py): its twin
        if strategy not in MODELLED:
            continue
        ingresses = int(res.get("ingress_replicas") or declared.get("ingress_replicas") or 1)
        own = []
        for workload in workload_names(res):
            if workload not in settings or not _twin(workload, settings[workload]):
                continue
            for load, m in (res.get(workload) or {}).items():
                if not isinstance(m, dict) or "ttft_p50_ms" not in m:
                    continue
                spec = m["load"]
                if spec["mode"] not in ("concurrency", "rate"):
                    continue  # a timed trace replay (mooncake rNN): no LoadPlan twin here
                level = spec.get("concurrency") or spec.get("rate")
                own.append(Cell(strategy, workload, load, spec["mode"], float(level), float(spec["duration_s"]), m,
                                system="" if system == strategy else system, ingresses=ingresses,
                                width=spec.get("session_width")))
        if strategy == RAY_TWIN:
            own = _with_before(own, res.get("runs") or [])
        out += own
    return out


def _with_before(cells: list[Cell], runs: list[dict]) -> list[Cell]:
    """``cells`` with ``before`` set from the run that measured each (the last run that finished its workload:load)."""
    by_key = {f"{c.workload}:{c.load}": c for c in cells}
    out = []
    for c in cells:
        key = f"{c.workload}:{c.load}"
        order = next((finished(r) for r in reversed(runs) if key in finished(r)), [])
        earlier = order[:order.index(key)] if key in order else []
        out.append(dataclasses.replace(c, before=tuple(by_key[k] for k in earlier if k in by_key)))
    return out


def simulate_cell(cell: Cell, engine: EngineModel, settings: dict, replicas: int, seed: int = 0,
                  per_replica: bool = False, keep_requests: bool = False) -> dict:
    """``cell`` in the simulator on the GPU run's prompts (``Cell.prompt_seed``); ``seed`` s draws the arrivals as the
    bench's ``--seed`` + s would (with ``Cell.split_load``, its processes' shares, session shards and arrival streams,
    ``load.split_driver``: ``seed`` 0 replays the GPU run's arrivals; else one stream of the whole load) and the
    routers' ties. Ray's twin first runs the cells its GPU run measured before it (``before``) on the tree it then
    starts from (the replicas' caches and kvserve's indexes start empty in every cell). ``keep_requests``: the summary
    also holds ``requests``, a row per measured request (``sim.simulate``'s)."""
    tree = RayTree() if cell.strategy == RAY_TWIN else None
    for prior in cell.before:
        _run(prior, engine, settings, replicas, seed, tree)
    res = _run(cell, engine, settings, replicas, seed, tree, keep_requests)
    out = res.summary(per_replica=per_replica)
    if keep_requests:
        out["requests"] = res.requests
    return out


def _run(cell: Cell, engine: EngineModel, settings: dict, replicas: int, seed: int, tree: RayTree | None,
         keep_requests: bool = False):
    args = settings["workloads"][cell.workload]
    sessions = sessions_for(cell.workload, args, engine.block_size, cell.prompt_seed)
    plan = LoadPlan(cell.mode, cell.level, duration_s=cell.duration_s, seed=cell.bench_seed + seed,
                    width=cell.width or (None if cell.mode == "concurrency" else 16))
    knobs = strategy_knobs(cell.strategy)
    engine = engine.with_(client_cores=cell.client_processes)  # the client's cores: the cell's bench processes
    processes = cell.client_processes if cell.split_load else 1
    return simulate(split_driver(sessions, plan, processes), knobs,
                    ClusterSpec(replicas, ingresses=cell.ingresses), engine, seed=seed, ray_tree=tree,
                    keep_requests=keep_requests)


def with_split_load(cells: list[Cell]) -> list[Cell]:
    """``cells`` (and the cells each ran after) replaying their bench processes (``Cell.split_load``)."""
    return [dataclasses.replace(c, split_load=True, before=tuple(with_split_load(list(c.before)))) for c in cells]


def modelled(cell: Cell) -> bool:
    """Every cell with a workload twin is modelled (TTFT p50 compared): open-loop ones, and closed-loop
    ones, whose TTFT is set by the throughput and the wait for KV blocks (``kv_admission``)."""
    return True


def fit_keys(cell: Cell) -> tuple[str, ...]:
    """What a cell contributes to the fit: TTFT and TPOT p50 for an open-loop cell; TPOT p50 and
    throughput for a closed-loop one (its TTFT then follows from them and stays a prediction)."""
    return ("ttft_p50_ms", "tpot_p50_ms") if cell.mode != "concurrency" else ("tpot_p50_ms", "output_tok_per_s")


def gpu_engine_stage_ms(measured: dict) -> float | None:
    """The mean of the cell's engine stage on the GPU (ms; kvserve's histogram: the replica received the request ->
    the engine's first output), None for a cell without stage histograms. ``--engine-stage`` fits the simulator's
    engine stage (routed to a replica -> its first token there: the replica's front end, the wait for a step, the
    step) to it."""
    return (((measured.get("evidence") or {}).get("stages_ms") or {}).get("engine") or {}).get("mean")


def _loss(cells: list[Cell], engine: EngineModel, settings: dict, replicas: int, engine_stage: bool = False) -> float:
    total = 0.0
    for c in cells:
        s = simulate_cell(c, engine, settings, replicas)
        for key in fit_keys(c):
            total += math.log(max(s[key], 1e-6) / max(c.measured[key], 1e-6)) ** 2
        gpu = gpu_engine_stage_ms(c.measured) if engine_stage else None
        if gpu:
            total += math.log(max(s["engine_ttft_mean_ms"], 1e-6) / gpu) ** 2
    return total


def fit(cells: list[Cell], engine: EngineModel, settings: dict, replicas: int, *, rounds: int = 4,
        free: tuple[str, ...] = FREE, bounds: dict | None = None, engine_stage: bool = False,
        log=print) -> tuple[EngineModel, dict]:
    """Multiplicative coordinate search over ``free`` (zero-valued terms start at a small seed), each
    field kept within ``bounds[field]`` = (low, high) where given; ``engine_stage`` also fits each cell's engine
    stage's mean to the GPU's where the cell has it (``gpu_engine_stage_ms``)."""
    seeds = {"prefill_attn_s": 5e-4, "prefill_step_s": 2e-3, "graph_step_s": 2e-3, "input_s_per_request": 2e-3,
             "decode_s_per_seq": 1e-4, "decode_s_per_ktok": 1e-5, "gpu_contention": 0.3, "prefill_contention": 0.3,
             "frontend_s_per_token": 1e-4, "replica_s_per_token": 2e-5}
    bounds = bounds or {}
    clamp = lambda k, v: min(max(v, bounds[k][0]), bounds[k][1]) if k in bounds else v
    best = engine.with_(**{k: clamp(k, getattr(engine, k) or seeds.get(k, 1.0)) for k in free})
    best_loss = _loss(cells, best, settings, replicas, engine_stage)
    evals, step = 1, 2.0
    for r in range(rounds):
        for name in free:
            for factor in (step, 1 / step):
                while True:
                    value = clamp(name, getattr(best, name) * factor)
                    if value == getattr(best, name):
                        break
                    cand = best.with_(**{name: value})
                    loss = _loss(cells, cand, settings, replicas, engine_stage)
                    evals += 1
                    if loss >= best_loss - 1e-9:
                        break
                    best, best_loss = cand, loss
        log(f"round {r}: loss {best_loss:.4f} after {evals} evaluations (step x{step:.3f})")
        step = math.sqrt(step)
    return best, {"loss": round(best_loss, 5), "evaluations": evals,
                  "fitted_on": [f"{c.name}/{c.workload}/{c.load}" for c in cells]}


def residuals(cells: list[Cell], engine: EngineModel, settings: dict, replicas: int) -> list[dict]:
    rows = []
    for c in cells:
        s = simulate_cell(c, engine, settings, replicas)
        row = {"workload": c.workload, "load": c.load, "system": c.name, "strategy": c.strategy,
               "ingresses": c.ingresses, "modelled": modelled(c)}
        for key in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms", "output_tok_per_s", "cache_hit_rate"):
            row[f"gpu_{key}"] = round(c.measured[key], 4 if "rate" in key else 1)
            row[f"sim_{key}"] = s[key]
        row["ttft_p50_error"] = round(s["ttft_p50_ms"] / c.measured["ttft_p50_ms"] - 1, 3)
        if c.runs_ttft_p50_ms:  # a cell run more than once: compared at its median run, every run's p50 beside it
            row["gpu_runs_ttft_p50_ms"] = [round(v, 1) for v in c.runs_ttft_p50_ms]
        engine_stage = ((c.measured.get("evidence") or {}).get("stages_ms") or {}).get("engine") or {}
        row["gpu_engine_ttft_p50_ms"] = engine_stage.get("p50")  # the replica's engine stage, kvserve's histogram
        row["sim_engine_ttft_p50_ms"] = s["engine_ttft_p50_ms"]
        row.update(engine_parts(c.measured.get("evidence") or {}, s))
        row["closed_loop"] = c.mode == "concurrency"
        rows.append(row)
    return rows


def engine_parts(evidence: dict, sim: dict) -> dict:
    """The engine stage's mean and its parts' means on the GPU (kvserve's histograms: vLLM's request stamps,
    ``deployments.stages.ENGINE_PARTS``) beside the simulator's (routed to the replica -> reaching its scheduler ->
    the step with its first chunk -> its first token); the GPU's are None for cells recorded before the parts
    were."""
    engine = ((evidence.get("stages_ms") or {}).get("engine") or {}).get("mean")
    parts = {k: v.get("mean") for k, v in (evidence.get("engine_parts_ms") or {}).items()}
    return {"gpu_engine_mean_ms": engine, "gpu_engine_parts_mean_ms": parts or None,
            "sim_engine_mean_ms": sim["engine_ttft_mean_ms"], "sim_engine_input_mean_ms": sim["engine_input_mean_ms"],
            "sim_engine_wait_mean_ms": sim["engine_wait_mean_ms"],
            "sim_engine_prefill_mean_ms": sim["engine_prefill_mean_ms"]}


def engine_parts_table(rows: list[dict]) -> str:
    """Markdown: per cell with the GPU's engine parts, the engine stage's mean and parts, GPU beside simulator;
    "" when no cell has them."""
    lines = []
    for r in rows:
        parts = r.get("gpu_engine_parts_mean_ms")
        if not parts:
            continue
        gpu = "/".join(_ms1(parts.get(k)) for k in ENGINE_PARTS)
        lines.append(f"| {r['workload']} | {r['load']} | {r.get('system', r['strategy'])} | "
                     f"{_ms1(r.get('gpu_engine_mean_ms'))} | {gpu} | {_ms1(r['sim_engine_mean_ms'])} | "
                     f"{_ms1(r.get('sim_engine_input_mean_ms'))}/{_ms1(r['sim_engine_wait_mean_ms'])}/"
                     f"{_ms1(r['sim_engine_prefill_mean_ms'])} |")
    if not lines:
        return ""
    head = ("| workload | load | system | GPU engine stage mean ms | GPU replica/vLLM front end/queue/prefill "
            "| sim engine mean ms | sim front end/wait/prefill |")
    return "\n".join([head, "|---|---|---|---:|---|---:|---|", *lines])


#: Two systems whose GPU TTFT p50s differ by less than this share of the larger are a tie for ``ordering``'s pairs:
#: a single 30-s cell's p50 moves by more than that between runs at saturation (docs/routing.md).
TIE_SHARE = 0.1


def ordering(rows: list[dict], tie: float = TIE_SHARE) -> dict:
    """Per (workload, load): systems by TTFT p50 on the GPU and in the simulator, and the pairs of systems the GPU
    tells apart (p50s more than ``tie`` of the larger apart): how many of those the simulator orders the same way."""
    out = {}
    for key in sorted({(r["workload"], r["load"]) for r in rows}):
        cell = [r for r in rows if (r["workload"], r["load"]) == key]
        name = lambda r: r.get("system", r["strategy"])
        gpu = [name(r) for r in sorted(cell, key=lambda r: r["gpu_ttft_p50_ms"])]
        sim = [name(r) for r in sorted(cell, key=lambda r: r["sim_ttft_p50_ms"])]
        apart = [(a, b) for i, a in enumerate(cell) for b in cell[i + 1:]
                 if abs(a["gpu_ttft_p50_ms"] - b["gpu_ttft_p50_ms"]) > tie * max(a["gpu_ttft_p50_ms"],
                                                                               b["gpu_ttft_p50_ms"])]
        agree = [(name(a), name(b)) for a, b in apart
                 if (a["gpu_ttft_p50_ms"] < b["gpu_ttft_p50_ms"]) == (a["sim_ttft_p50_ms"] < b["sim_ttft_p50_ms"])]
        out["/".join(key)] = {"gpu": gpu, "sim": sim, "same_best": gpu[0] == sim[0], "same_order": gpu == sim,
                              "pairs_apart": len(apart), "pairs_same_order": len(agree)}
    return out



def _ms(v) -> str:
    return "" if v is None else f"{v:.0f}"


def _ms1(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def residual_table(rows: list[dict]) -> str:
    lines = [("| workload | load | system | GPU TTFT p50 ms | sim | error | GPU p99 | sim p99 | GPU tok/s | "
              "sim tok/s | GPU hit | sim hit | GPU TPOT ms | sim TPOT | GPU engine stage p50 ms | sim |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        load = r["load"] if r.get("modelled", True) else f"{r['load']} (not modelled)"
        runs = r.get("gpu_runs_ttft_p50_ms")  # a cell run more than once: its median run, every run's p50 after it
        gpu = f"{r['gpu_ttft_p50_ms']:.0f}" + (f" (runs {', '.join(f'{v:.0f}' for v in runs)})" if runs else "")
        lines.append(f"| {r['workload']} | {load} | {r.get('system', r['strategy'])} | {gpu} | "
                     f"{r['sim_ttft_p50_ms']:.0f} | "
                     f"{r['ttft_p50_error']:+.0%} | {r['gpu_ttft_p99_ms']:.0f} | {r['sim_ttft_p99_ms']:.0f} | "
                     f"{r['gpu_output_tok_per_s']:.0f} | {r['sim_output_tok_per_s']:.0f} | "
                     f"{r['gpu_cache_hit_rate']:.2f} | "
                     f"{r['sim_cache_hit_rate']:.2f} | {r['gpu_tpot_p50_ms']:.1f} | {r['sim_tpot_p50_ms']:.1f} | "
                     f"{_ms(r.get('gpu_engine_ttft_p50_ms'))} | {_ms(r.get('sim_engine_ttft_p50_ms'))} |")
    return "\n".join(lines)
