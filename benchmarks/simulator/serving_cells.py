"""The engine fit on a serving-overhead GPU JSON (``vllm bench serve``, random prompts) and its cells.

Owns ``ServingCell`` (one system at one concurrency, the median over its runs), ``serving_cells``,
``fit_serving`` (the engine's cost fields, in closed form), ``fit_prefill_step``, ``simulate_serving`` and
``serving_residuals``.

The JSON is what ``benchmarks/gpu/serving_overhead.py`` writes: ``runs``, each one system
(``vllm_serve``, ``kvserve``, ``kvserve_nomerge``) with ``c1`` and ``c64`` results of ``vllm bench
serve`` (random ``L`` in / ``O`` out, ignore-eos, so nothing is shared and every request has the same
shape) and, for ``vllm_serve``, ``engine_ms``: the means of vLLM's own queue, prefill and TTFT
histograms. The fit reads three numbers off ``vllm_serve`` (means over its runs):

    P1    = engine prefill at c=1        = step_s + prefill_step_s + L / prefill_tokens_per_s + attn(L)
    ITL1  = median inter-token gap, c=1  = step_s + decode_s_per_ktok * (L + O/2) / 1e3
    ITL64 = median inter-token gap, c=64 = step_s + decode_s_per_ktok * 64 (L + O/2) / 1e3

(the median gap at c=64 is a decode-only step: prefill steps are a few per wave of 64). One prompt
length cannot separate a per-request decode cost from a per-context-token one, so the whole batch
term goes to context (``decode_s_per_seq`` = 0): decoding reads every running request's KV.
``attn(L)`` is not identifiable from one length either: ``prefill_attn_s`` is derived from the model
shape (attention FLOPs per query-key pair over linear FLOPs per token, at the fitted prefill speed). Nor is
``prefill_step_s``, what a step costs for carrying prefill at all: it is given (``calibrate --prefill-step-ms``; 0 by
default) and taken out of P1 before the prefill speed is, so the speed is the marginal one that a wave of 8K-token
chunks at c=64 runs at. ``fit_prefill_step`` picks it from the c=64 cells' TPOT and throughput, which the mixed steps
set (``calibrate --prefill-step-ms fit``), leaving their TTFT the test.
``input_s_per_request`` is vLLM's front end at c=1 from the same histograms (engine TTFT - queue -
prefill: tokenisation, the hop to the engine core, the first output), a FIFO server per replica, so
a wave of arrivals queues there as in vLLM's API server. ``request_overhead_s`` is the rest: each
system's client TTFT p50 at c=1 minus P1 and the front end (HTTP, the client, kvserve's ingress).
Both are measured, not fitted, so the c=1 TTFT is matched by construction and the c=64 cells are the
test.

A kvserve run that carries its stage histograms (``stages_ms`` at c=1, means) is simulated with its
overhead split by them (``kvserve_split``): the ingress's CPU work per request (``INGRESS_STAGES``:
accept, tokenise, hash, on the ingress's event loop or its one prepare thread) is one CPU core per
ingress replica (``frontend_s_per_request``, shared as ``EngineModel.frontend_sharing`` says,
``ingresses`` of them, requests spread round-robin); the
engine has no front end of its own (``input_s_per_request`` = 0: the ingress hands it token ids);
the rest (dispatch, the replica's return path, the first byte, HTTP and the client) is
``request_overhead_s``, a fixed latency. The engine written for other uses (``fit_serving``'s
engine) keeps the unsplit form.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.load import Driver, LoadPlan
from benchmarks.simulator.sim import ClusterSpec, simulate
from benchmarks.simulator.workloads import no_sharing, trace_sessions
from serve_app.config.routing import RoutingConfig

SYSTEMS = ("vllm_serve", "kvserve", "kvserve_nomerge")
#: kvserve's stages that are CPU work in the ingress replica, before the request is routed.
INGRESS_STAGES = ("tokenize", "hash")
METRICS = {"ttft_p50_ms": "median_ttft_ms", "ttft_p90_ms": "p90_ttft_ms", "tpot_p50_ms": "median_tpot_ms",
           "itl_p50_ms": "median_itl_ms", "output_tok_per_s": "output_throughput"}
#: Model shapes: (layers, query heads, kv heads, head dim, parameters).
SHAPES = {"llama-3.2-1b": (16, 32, 8, 64, 1.24e9), "llama-3.1-8b": (32, 32, 8, 128, 8.03e9)}


@dataclass(frozen=True)
class ServingCell:
    system: str
    concurrency: int
    prompts: int
    measured: dict  # METRICS keys: the median over runs
    runs: int


def kv_bytes_per_token(shape: str) -> int:
    layers, _, kv_heads, head_dim, _ = SHAPES[shape]
    return layers * kv_heads * head_dim * 2 * 2  # K and V, 2 bytes each


def attn_per_pair_s(shape: str, prefill_tokens_per_s: float) -> float:
    """``prefill_attn_s`` from the shape: a query-key pair costs 4 x layers x heads x head_dim FLOPs
    (QK^T and PV), a token's linear layers 2 x parameters, run at the same FLOP rate."""
    layers, heads, _, head_dim, params = SHAPES[shape]
    pair_over_token = 4 * layers * heads * head_dim / (2 * params)
    return pair_over_token / prefill_tokens_per_s * 1e6


def _lengths(doc: dict) -> tuple[int, int]:
    """Input and output length from the bench command (``--random-input-len`` / ``--random-output-len``)."""
    for run in doc["runs"]:
        cmd = (run.get("c1") or {}).get("command", "").split()
        if "--random-input-len" in cmd:
            return int(cmd[cmd.index("--random-input-len") + 1]), int(cmd[cmd.index("--random-output-len") + 1])
    raise ValueError("no run carries a vllm bench command with --random-input-len")


def _prompts(doc: dict, level: str) -> int:
    for run in doc["runs"]:
        cmd = (run.get(level) or {}).get("command", "").split()
        if "--num-prompts" in cmd:
            return int(cmd[cmd.index("--num-prompts") + 1])
    return max(r[level]["completed"] for r in doc["runs"] if r.get(level))


def serving_cells(doc: dict) -> list[ServingCell]:
    """One cell per (system, concurrency) with at least one completed run; values are medians over runs."""
    out = []
    for system in SYSTEMS:
        for level, conc in (("c1", 1), ("c64", 64)):
            rs = [r[level] for r in doc["runs"] if r["system"] == system and r.get(level, {}).get("completed")]
            if rs:
                measured = {k: statistics.median(r[src] for r in rs) for k, src in METRICS.items()}
                out.append(ServingCell(system, conc, _prompts(doc, level), measured, len(rs)))
    return out


def _engine_means(doc: dict, level: str, key: str) -> float:
    xs = [r[level]["engine_ms"][key] for r in doc["runs"]
          if r["system"] == "vllm_serve" and (r.get(level) or {}).get("engine_ms", {}).get(key) is not None]
    if not xs:
        raise ValueError(f"no vllm_serve run has engine_ms.{key} at {level}")
    return statistics.fmean(xs)


def kvserve_split(doc: dict, system: str, ttft_c1_s: float, prefill_c1_s: float, ingresses: int) -> dict | None:
    """``system``'s c=1 overhead split by its stage histograms (means over its runs), or None without them."""
    stages = [r["c1"]["stages_ms"] for r in doc["runs"]
              if r["system"] == system and (r.get("c1") or {}).get("stages_ms")]
    if not stages:
        return None
    means = {k: statistics.fmean(s[k] for s in stages) for k in stages[0]}
    ingress = sum(means[k] for k in INGRESS_STAGES) / 1e3
    return {"ingresses": ingresses, "frontend_s_per_request": round(ingress, 6), "input_s_per_request": 0.0,
            "request_overhead_s": round(ttft_c1_s - prefill_c1_s - ingress, 6), "runs": len(stages),
            "stages_ms_c1": {k: round(v, 3) for k, v in means.items()}}


def fit_serving(doc: dict, *, model_shape: str, base: EngineModel, ingresses: int = 2,
                prefill_step_s: float = 0.0) -> tuple[EngineModel, dict]:
    """The engine's cost fields from ``vllm_serve``'s c=1 and c=64 runs, with a step carrying prefill costing
    ``prefill_step_s`` more; returns (engine, the inputs and overheads)."""
    L, O = _lengths(doc)
    cells = {(c.system, c.concurrency): c for c in serving_cells(doc)}
    p1 = _engine_means(doc, "c1", "prefill") / 1e3
    itl1 = cells["vllm_serve", 1].measured["itl_p50_ms"] / 1e3
    itl64 = cells["vllm_serve", 64].measured["itl_p50_ms"] / 1e3
    ctx = (L + O / 2) / 1e3
    per_ktok = (itl64 - itl1) / (63 * ctx)
    step = itl1 - per_ktok * ctx
    if p1 - step - prefill_step_s <= 0:
        raise ValueError(f"the c=1 prefill ({p1 * 1e3:.1f} ms) leaves nothing for the prompt after the step "
                         f"({step * 1e3:.1f} ms) and the prefill step's surcharge ({prefill_step_s * 1e3:.1f} ms)")
    rate = L / (p1 - step - prefill_step_s)  # first pass without attention; attention is a few % at these lengths
    for _ in range(3):
        attn = attn_per_pair_s(model_shape, rate)
        rate = L / (p1 - step - prefill_step_s - attn * L * (L / 2) / 1e6)
    front = _engine_means(doc, "c1", "ttft") / 1e3 - p1 - _engine_means(doc, "c1", "queue") / 1e3
    overheads = {s: round(cells[s, 1].measured["ttft_p50_ms"] / 1e3 - p1 - front, 5)
                 for s in SYSTEMS if (s, 1) in cells}
    engine = base.with_(input_s_per_request=front, step_s=step, decode_s_per_seq=0.0, decode_s_per_ktok=per_ktok,
                        prefill_tokens_per_s=rate, prefill_step_s=prefill_step_s,
                        prefill_attn_s=attn, kv_bytes_per_token=kv_bytes_per_token(model_shape),
                        request_overhead_s=overheads.get("kvserve", overheads["vllm_serve"]))
    inputs = {"input_len": L, "output_len": O, "engine_prefill_ms_c1": round(p1 * 1e3, 3),
              "prefill_step_ms": round(prefill_step_s * 1e3, 3),
              "engine_front_end_ms_c1": round(front * 1e3, 3),
              "itl_p50_ms_c1": round(itl1 * 1e3, 3), "itl_p50_ms_c64": round(itl64 * 1e3, 3),
              "request_overhead_s": overheads}
    splits = {s: kvserve_split(doc, s, cells[s, 1].measured["ttft_p50_ms"] / 1e3, p1, ingresses)
              for s in SYSTEMS if s != "vllm_serve" and (s, 1) in cells}
    inputs["stage_split"] = {s: v for s, v in splits.items() if v}
    return engine, inputs


#: ``fit_prefill_step``'s candidates, ms: what carrying prefill may add to a step, in 0.5-ms steps.
PREFILL_STEP_GRID_MS = tuple(i / 2 for i in range(25))


def fit_prefill_step(doc: dict, *, model_shape: str, base: EngineModel,
                     ingresses: int = 2) -> tuple[float, list[dict], tuple[EngineModel, dict]]:
    """The ``prefill_step_s`` (of ``PREFILL_STEP_GRID_MS``) whose serving fit best reproduces the c=64 cells' TPOT p50
    and throughput (squared log errors, every system with its own overhead); returns it, each candidate's loss and
    its ``fit_serving`` result. The c=1 cells stay matched by construction and the c=64 TTFT is not looked at.
    Raises ``fit_serving``'s ValueError when not even 0 ms fits."""
    rows, best, best_loss = [], None, math.inf
    for ms in PREFILL_STEP_GRID_MS:
        try:
            fit = fit_serving(doc, model_shape=model_shape, base=base, ingresses=ingresses, prefill_step_s=ms / 1e3)
        except ValueError:
            if not rows:
                raise
            break  # the surcharge has eaten the c=1 prefill: larger ones cannot fit either
        engine, inputs = fit
        res = serving_residuals(doc, engine, inputs["request_overhead_s"], inputs["stage_split"])
        loss = sum(math.log(r[f"sim_{k}"] / r[f"gpu_{k}"]) ** 2 for r in res if r["concurrency"] > 1
                   for k in ("tpot_p50_ms", "output_tok_per_s"))
        rows.append({"prefill_step_ms": ms, "loss": round(loss, 6)})
        if loss < best_loss:
            best, best_loss = (ms / 1e3, fit), loss
    return best[0], rows, best[1]


def simulate_serving(cell: ServingCell, engine: EngineModel, doc: dict, seed: int = 0, ingresses: int = 1) -> dict:
    """``vllm bench serve`` in the simulator: one replica, ``prompts`` random requests, closed loop."""
    L, O = _lengths(doc)
    reqs = no_sharing(cell.prompts, 1.0, prompt_tokens=L, output_tokens=O, block_size=engine.block_size, seed=seed)
    plan = LoadPlan("concurrency", cell.concurrency, num_requests=cell.prompts, seed=seed)
    knobs = RoutingConfig(strategy="round-robin").knobs()
    return simulate(Driver(iter(trace_sessions(reqs)), plan), knobs, ClusterSpec(1, ingresses=ingresses), engine,
                    seed=seed).summary(per_replica=False)


def serving_residuals(doc: dict, engine: EngineModel, overheads: dict, splits: dict | None = None) -> list[dict]:
    """Measured vs simulated per cell; each system runs with its own measured overhead: its stage split
    (``splits[system]``, from ``fit_serving``'s ``stage_split``) where it has one, else ``overheads[system]``."""
    rows = []
    for cell in serving_cells(doc):
        split = (splits or {}).get(cell.system)
        if split:
            e = engine.with_(frontend_s_per_request=split["frontend_s_per_request"],
                             input_s_per_request=split["input_s_per_request"],
                             request_overhead_s=split["request_overhead_s"])
            sim = simulate_serving(cell, e, doc, ingresses=split["ingresses"])
        else:
            sim = simulate_serving(cell, engine.with_(request_overhead_s=overheads[cell.system]), doc)
        row = {"system": cell.system, "concurrency": cell.concurrency, "runs": cell.runs,
               "by_construction": cell.concurrency == 1, "stage_split": bool(split)}
        for key in ("ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "output_tok_per_s"):
            row[f"gpu_{key}"] = round(cell.measured[key], 1)
            row[f"sim_{key}"] = sim[key]
            row[f"{key}_error"] = round(sim[key] / cell.measured[key] - 1, 3)
        row["gpu_itl_p50_ms"] = round(cell.measured["itl_p50_ms"], 2)
        rows.append(row)
    return rows


def serving_table(rows: list[dict]) -> str:
    lines = [("| system | c | runs | GPU TTFT p50 ms | sim | error | GPU TTFT p90 | sim p90 | GPU TPOT p50 ms | "
              "sim | error | GPU out tok/s | sim | error |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = " (fit)" if r["by_construction"] else ""
        lines.append(f"| {r['system']} | {r['concurrency']}{mark} | {r['runs']} | {r['gpu_ttft_p50_ms']:.1f} | "
                     f"{r['sim_ttft_p50_ms']:.1f} | {r['ttft_p50_ms_error']:+.0%} | {r['gpu_ttft_p90_ms']:.0f} | "
                     f"{r['sim_ttft_p90_ms']:.0f} | {r['gpu_tpot_p50_ms']:.2f} | {r['sim_tpot_p50_ms']:.2f} | "
                     f"{r['tpot_p50_ms_error']:+.0%} | {r['gpu_output_tok_per_s']:.0f} | "
                     f"{r['sim_output_tok_per_s']:.0f} | {r['output_tok_per_s_error']:+.0%} |")
    return "\n".join(lines)
