"""Calibrate the engine model on GPU results and show how well the simulator reproduces them.

Owns the CLI and what the routing fit frees and within which bounds (``ROUTING_FREE``, ``ENGINE_BOUNDS``,
``SHAPE_BOUNDS``, ``frontend_bounds``) and where it starts (``for_shape``, ``ingress_work``, ``fit_start``); the
routing cells themselves, their simulation, the fit, the residuals and the ordering are ``routing_cells.py``'s.
The engine's costs come from a
serving-overhead JSON (``serving_cells.fit_serving``: prefill, decode step, front end, overheads, in
closed form; kvserve's cells are simulated with its overhead split by its stage histograms where the
JSON has them, over ``--ingresses`` ingress replicas, and also without, for comparison); the KV tier's
GB/s from a KV-tier JSON (``effective_load_gbps``) or ``--tier-gbps``, the in-process engine's front end
from that JSON's two floors (``tier_cell.fit_engine_floor``: a 32-token prompt and a GPU-cache hit), the
fixed cost of a hit beyond the copy (``tier_hit_s``) from its hit TTFT (``tier_cell.fit_tier_hit_s``), and
its TTFT cell (``tier_cell.py``) is reproduced from that JSON or ``--tier-check``; KV capacity and the prefill chunk
are the deployment's settings (``--kv-blocks``, ``--chunk-tokens``, ``--async-scheduling``); what a step costs for
carrying prefill (``--prefill-step-ms``: given, or ``fit`` from the c=64 cells' TPOT and throughput) is taken out of
the c=1 prefill before the prefill speed is fitted.

With ``--routing``, the engine is carried to the routing run's model shape (``for_shape``: prefill
rate by parameter count, KV bytes and the per-context decode cost by the shape), takes kvserve's stage
split (its ingress work on one processor-sharing core per ingress, the system's ``ingress_replicas``),
the run's KV blocks (``num_gpu_blocks_override``, with ``kv_admission``: requests wait for blocks), and
the fields one serving run cannot pin (``ROUTING_FREE``: prefill rate and attention term, the fixed
step cost, the per-context decode cost, ``gpu_contention`` between replicas sharing a GPU, the replica's
cost per streamed token on its front end (``replica_s_per_token``: the dispatch stage), and the
ingress's costs per request and per streamed token, kept within ``frontend_bounds``: the GPU host's
tokenise + hash below, the CPU-measured ingress of ``--ingress-capacity`` above) are fitted on its
round-robin cells, which measure the engine (round-robin ignores caches): open-loop cells on TTFT and
TPOT p50, closed-loop ones on TPOT p50 and throughput. Every other number is a prediction: the
cache-aware cells, and the closed-loop cells' TTFT; their residuals and the strategies' ordering say
how far to trust the simulator for routing. Ray's router is simulated by its twin (``ray_twin.py``).
With ``--ingress-work split`` the ingress's work per request is kvserve's by kind (``ingress_work``: the tokeniser
for text prompts only, the block hashes per 1K prompt tokens for the hashing strategies only, the rest fitted)
instead of the serving run's tokenise + hash on every request ("lumped", the default); ``--decode-per-seq`` also
fits ``decode_s_per_seq``; both within physical bounds (``ENGINE_BOUNDS``, ``frontend_bounds``). With
``--client-logs`` (the run's bench JSONs or log archives), the load generator is one processor-sharing core per
bench process of each cell (``EngineModel.client_cores``) whose costs per request and per streamed token (over what
its loop's background load leaves) are fitted from the CPU seconds each cell's client measured of itself
(``client_fit.py``), set before the fit and not moved by it; the rest of the latency at c=1 (``request_overhead_s``,
measured with another client) is then free to shrink. With ``--ingress-cpu`` the ingress's costs per request and per
streamed token are set the same way, from the GPU host's measure of each ingress replica's loop in the routing
JSON's ``host_cpu`` evidence (``ingress_fit.py``), and left out of the fit; with ``--tree-cost`` the Ray twin's calls to
its tree actor hold the ingress's loop for what ``ray_tree_cost`` measured (``ingress_fit.tree_call_costs``), also
set before the fit (the round-robin cells it fits make no such call); with ``--ray-reply`` the twin has Serve's reply
to each send ``EngineModel.ray_reply_s`` after its replica took the request, from the GPU's decision-to-insert times
of Ray's cells (``ingress_fit.ray_reply``), set after the fit. ``--frontend loop`` runs the routing
cells' ingresses as kvserve's event loop instead of a processor-sharing core (``EngineModel.frontend_sharing``:
callbacks in arrival order, a request's work before routing in ``--frontend-hops`` callbacks, chunks merged while
the loop is busier than ``--frontend-merge-busy``), with the same costs free. ``--ingress-balance leastconn`` spreads
the routing cells' requests over their ingresses as Serve's HAProxy does (``EngineModel.ingress_balance``), not
round-robin. ``--prefill-contention`` also fits
``EngineModel.prefill_contention`` (prefill chunks of co-located engines sharing the GPU's arithmetic),
``--prefill-step-apart`` keeps the surcharge of a step carrying prefill out of the contention
(``prefill_step_contends``), and ``--tokenize-profile`` holds the ingress's loop for each chat prompt's inline
tokenising at what py-spy measured on the GPU runs' ingresses (``ingress_fit.tokenize_hold``), set before the fit.
``--first-text`` makes the TTFT of a share of token-id prompts their second token's, the share of the GPU runs' such
requests whose first token decoded to no text (``text_fit.first_text``, ``EngineModel.empty_first_share``), set
before the fit.

CLI: ``python -m benchmarks.simulator.calibrate --overhead O.json [--kv-tier K.json | --tier-gbps G]
[--routing R.json]`` writes ``sim_calibration.json`` (engine, inputs, residual tables) and prints them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from benchmarks.bench.result import git_commit, machine_info
from benchmarks.simulator.client_fit import client_rows, fit_client
from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.ingress_fit import FIELDS as INGRESS_FIELDS
from benchmarks.simulator.ingress_fit import (
    TREE_FIELDS,
    fit_ingress,
    ingress_rows,
    ray_reply,
    tokenize_hold,
    tree_call_costs,
)
from benchmarks.simulator.repeats import with_repeats
from benchmarks.simulator.routing_cells import (
    engine_parts_table,
    fit,
    ordering,
    residual_table,
    residuals,
    with_split_load,
)
from benchmarks.simulator.serving_cells import (
    SHAPES,
    attn_per_pair_s,
    fit_prefill_step,
    fit_serving,
    kv_bytes_per_token,
    serving_residuals,
    serving_table,
)
from benchmarks.simulator.text_fit import first_text
from benchmarks.simulator.tier_cell import LLM_CLASS_CHUNK_TOKENS, fit_engine_floor, fit_tier_hit_s, tier_row

ROUTING_FREE = ("prefill_tokens_per_s", "prefill_attn_s", "step_s", "decode_s_per_ktok", "gpu_contention",
                "frontend_s_per_request", "frontend_s_per_token", "replica_s_per_token")
#: Physical bounds of the engine's free fields in the routing fit: a co-located replica's step is at most
#: doubled by each busy peer (``gpu_contention`` <= 1: the GPU time-sliced between them), its prefill chunks at most
#: doubled again by each peer prefilling (``prefill_contention`` <= 1, ``--prefill-contention``), a peer only decoding
#: counts for at most one prefilling there (``decoding_peer_share`` <= 1, ``--decoding-peer-share``), and a decoding
#: sequence costs a step at most 1 ms beyond its KV read (its sampling and output processing), and carrying prefill
#: costs a step 0.1-50 ms beyond its chunks (``prefill_step_s``, ``--engine-stage``; ``graph_step_s`` for a step within
#: the CUDA-graph size, ``--graph-step-ms fit``), and the replica's front end
#: 0.1-30 ms per request (``input_s_per_request``, ``--engine-stage``).
ENGINE_BOUNDS = {"gpu_contention": (0.01, 1.0), "prefill_contention": (0.01, 1.0), "decoding_peer_share": (0.01, 1.0),
                 "prefill_step_s": (1e-4, 0.05), "graph_step_s": (1e-4, 0.05),
                 "decode_s_per_seq": (1e-6, 1e-3), "replica_s_per_token": (1e-6, 1e-3),
                 "input_s_per_request": (1e-4, 0.03)}
#: How far the fit may move the two context terms from the start (``for_shape``'s, with ``--shape-bounds``): the
#: per-context decode cost was measured on the serving run (its ITL's growth with the batch's context) and carried
#: to the shape by KV bytes, the attention term derived from the shape's FLOPs; the round-robin cells alone
#: cannot tell the two apart (both grow with context) and, left free, trade one for the other.
SHAPE_BOUNDS = {"decode_s_per_ktok": 2.0, "prefill_attn_s": 8.0}


def fit_start(specs: list[str], free: tuple[str, ...], option: str = "--start") -> dict[str, float]:
    """``--start FIELD=VALUE`` (or ``--hold``) options as fields of the fit's start; a field the fit does not move is
    an error."""
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or name not in free:
            raise SystemExit(f"{option} {spec!r}: expected FIELD=VALUE with FIELD one of the fitted fields "
                             f"{list(free)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise SystemExit(f"{option} {spec!r}: {value!r} is not a number") from None
    return out


def shape_bounds(start: EngineModel) -> dict:
    """``SHAPE_BOUNDS`` as (low, high) around ``start``'s values."""
    return {k: (getattr(start, k) / f, getattr(start, k) * f) for k, f in SHAPE_BOUNDS.items() if getattr(start, k) > 0}


def ingress_work(split: dict, input_len: int) -> dict:
    """kvserve's ingress work per request by kind, from its stage histograms at c=1 (``split``, the serving
    run's random text prompts of ``input_len`` tokens): the tokeniser per text prompt
    (``frontend_tokenize_s``: token-id prompts skip it), the block hashes per 1K prompt tokens
    (``frontend_hash_s_per_ktok``: one hash per block; only prefix-aware and kv-aware hash) and the
    routing decision, the start of the fixed part that every request pays (``frontend_s_per_request``)."""
    stages = split.get("stages_ms_c1") or {}
    if not stages:
        return {"frontend_s_per_request": split.get("frontend_s_per_request", 0.0)}
    return {"frontend_s_per_request": round(stages.get("route", 0.0) / 1e3, 6),
            "frontend_tokenize_s": round(stages.get("tokenize", 0.0) / 1e3, 6),
            "frontend_hash_s_per_ktok": round(stages.get("hash", 0.0) / input_len, 7)}


def frontend_bounds(split: dict, capacity: dict | None, mode: str = "lumped") -> dict:
    """Where the ingress's two fitted costs may go: per request, from a floor measured on the GPU host at
    c=1 (``split``; ``mode`` "lumped", its tokenise + hash, which the ingress also parses, routes and dispatches
    beyond; "split", its routing decision, the tokeniser and the hashes being set apart by ``ingress_work``)
    up to the CPU figure of ``ingress_capacity`` (a slower machine's whole ingress); per token, up to the
    CPU figure."""
    cpu = (capacity or {}).get("cost_fit", {}).get("ingress", {})
    req_hi = cpu.get("cpu_ms_per_request", 11.3) / 1e3
    tok_hi = cpu.get("cpu_us_per_token", 184.0) / 1e6
    if mode == "split":
        floor = (split.get("stages_ms_c1") or {}).get("route", 0.0) / 1e3
    else:
        floor = split.get("frontend_s_per_request", 0.0)
    return {"frontend_s_per_request": (min(floor, req_hi), req_hi), "frontend_s_per_token": (tok_hi / 100, tok_hi)}


def for_shape(engine: EngineModel, from_shape: str, to_shape: str) -> EngineModel:
    """The start of the routing fit when its replicas run another model shape than the serving run's:
    prefill rate scaled by the parameter count (FLOPs per token), the attention term derived from the
    shape at that rate, KV bytes per token from the shape and the per-1K-context decode cost with them
    (a KV read); the fixed step cost is kept (the fit moves it)."""
    if from_shape == to_shape:
        return engine
    rate = engine.prefill_tokens_per_s * SHAPES[from_shape][4] / SHAPES[to_shape][4]
    kv = kv_bytes_per_token(to_shape)
    return engine.with_(prefill_tokens_per_s=rate, prefill_attn_s=attn_per_pair_s(to_shape, rate),
                        kv_bytes_per_token=kv,
                        decode_s_per_ktok=engine.decode_s_per_ktok * kv / engine.kv_bytes_per_token)


def _step_ms(text: str) -> float | str:
    """``--prefill-step-ms`` and ``--graph-step-ms``: milliseconds, or "fit"."""
    if text == "fit":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds or 'fit', not {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.simulator.calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--overhead", required=True, help="serving-overhead GPU JSON (runs of vllm bench serve, c1/c64)")
    ap.add_argument("--kv-tier", default=None, help="KV tier GPU JSON (effective_load_gbps)")
    ap.add_argument("--tier-gbps", type=float, default=None, help="tier load GB/s when no KV tier JSON is given")
    ap.add_argument("--tier-source", default=None, help="where --tier-gbps was measured (recorded in the output)")
    ap.add_argument("--tier-check", default=None, metavar="PREFIX_TOKENS:RECOMPUTE_MS:TIER_HIT_MS",
                    help="a KV-tier GPU result given by hand (without --kv-tier): reproduced in the output")
    ap.add_argument("--routing", default=None, help="routing head-to-head JSON (kvserve.routing_h2h/1) of the same GPU")
    ap.add_argument("--routing-repeats", nargs="+", default=[], metavar="ROUTING_JSON",
                    help="results of the same scale and config that ran some of --routing's cells again: each such "
                         "cell is compared at its median run (repeats.with_repeats), every run's p50 beside it")
    ap.add_argument("--ingress-capacity", default="benchmarks/results/ingress_capacity_cpu.json",
                    help="the ingress's CPU costs measured on a CPU (bounds the fitted ones; '' for none)")
    ap.add_argument("--client-logs", nargs="*", default=[],
                    help="bench JSONs or log archives of the routing run (summary.client.cpu_s): the client's core")
    ap.add_argument("--replicas", type=int, default=4, help="replicas in the routing run (all on one GPU)")
    ap.add_argument("--routing-model-shape", default="llama-3.2-1b", choices=sorted(SHAPES),
                    help="the routing run's model shape (configs/gpu-routing.yaml: llama-3.2-1b)")
    ap.add_argument("--model-shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--ingresses", type=int, default=2,
                    help="ingress replicas in the serving run (configs/gpu.yaml: 2); used with kvserve's stage split")
    ap.add_argument("--kv-blocks", type=int, default=4096, help="KV blocks per replica (num_gpu_blocks_override)")
    ap.add_argument("--chunk-tokens", type=int, default=8192, help="max_num_batched_tokens (vLLM's default on an H200)")
    ap.add_argument("--prefill-step-ms", type=_step_ms, default=0.0,
                    help="what a step costs for carrying prefill (prefill_step_s, ms), taken out of the serving run's "
                         "c=1 prefill before its speed is fitted; 'fit': the value whose fit best reproduces the c=64 "
                         "cells' TPOT and throughput (serving_cells.fit_prefill_step)")
    ap.add_argument("--ingress-work", choices=("lumped", "split"), default="lumped",
                    help="kvserve's ingress work per request in the routing fit: 'lumped' (tokenise + hash of the "
                         "serving run on every request) or 'split' (tokeniser for text prompts only, hashes per 1K "
                         "tokens for the hashing strategies only, the rest fitted: ingress_work)")
    ap.add_argument("--decode-per-seq", action="store_true",
                    help="also fit decode_s_per_seq (the serving fit sets it to 0) in the routing fit")
    ap.add_argument("--frontend", choices=("ps", "loop"), default="ps",
                    help="the routing cells' ingress: a processor-sharing core, or kvserve's event loop (callbacks "
                         "in arrival order, chunks merged while it is busy)")
    ap.add_argument("--ingress-balance", choices=("round-robin", "leastconn"), default="round-robin",
                    help="how the routing cells' requests are spread over their ingresses: round-robin, or leastconn "
                         "as Serve's HAProxy does (fewest streams open)")
    ap.add_argument("--frontend-hops", type=int, default=3,
                    help="--frontend loop: callbacks a request's work before routing is split into")
    ap.add_argument("--frontend-merge-busy", type=float, default=0.5,
                    help="--frontend loop: busy share above which the streams it routes merge chunks (kvserve's "
                         "ingress.stream_merge_busy; 0: never)")
    ap.add_argument("--async-scheduling", choices=("on", "off"), default="off",
                    help="the engines' scheduling (EngineModel.async_scheduling): vLLM forms the next step while one "
                         "runs unless told otherwise (its log says 'Asynchronous scheduling is enabled'); default off "
                         "so that the calibrations committed before it reproduce from their commands")
    ap.add_argument("--engine-stage", action="store_true",
                    help="also fit prefill_step_s and the replica's front end (input_s_per_request), and each "
                         "round-robin cell's engine stage (the replica received it -> first output) to the GPU's")
    ap.add_argument("--ingress-cpu", action="store_true",
                    help="set the ingress's costs per request and per streamed token from the GPU host's own measure "
                         "of each ingress replica's loop (the routing JSON's host_cpu evidence; ingress_fit.py) "
                         "instead of fitting them")
    ap.add_argument("--tree-cost", metavar="RAY_TREE_COST_JSON",
                    help="hold the ingress's loop for each synchronous call of Ray's router to its tree actor (the Ray "
                         "twin's cells only), at the cost a ray_tree_cost JSON measured (ingress_fit.tree_call_costs)")
    ap.add_argument("--prefill-contention", action="store_true",
                    help="also fit prefill_contention: prefill chunks of replicas sharing a GPU cost more per peer "
                         "prefilling at once (EngineModel.prefill_contention)")
    ap.add_argument("--decoding-peer-share", action="store_true",
                    help="also fit decoding_peer_share: what a co-located peer only decoding counts for in "
                         "gpu_contention against one prefilling (EngineModel.decoding_peer_share, 1 unless fitted)")
    ap.add_argument("--prefill-step-apart", action="store_true",
                    help="a step's surcharge for carrying prefill (prefill_step_s) is the engine's own time, outside "
                         "the GPU's contention (EngineModel.prefill_step_contends false)")
    ap.add_argument("--graph-tokens", type=int, default=0, metavar="N",
                    help="a step scheduling at most N tokens runs as a CUDA graph and pays graph_step_s "
                         "(--graph-step-ms; 0 unless given) instead of prefill_step_s (EngineModel.graph_tokens; "
                         "vLLM's max_cudagraph_capture_size, 512 by default; 0: off)")
    ap.add_argument("--graph-step-ms", type=_step_ms, metavar="MS|fit",
                    help="with --graph-tokens: what a step within them costs for carrying prefill (graph_step_s: "
                         "its attention outside the piecewise graphs), in ms or 'fit' (within prefill_step_s's bounds)")
    ap.add_argument("--split-load", action="store_true",
                    help="replay each routing cell's bench processes (their shares, session shards and arrival "
                         "streams: routing_cells.with_split_load) rather than one stream of the whole load")
    ap.add_argument("--client-sharing", choices=("ps", "fifo"), default="ps",
                    help="how a bench process's core serves its requests' work: processor sharing (the default) or "
                         "one callback after the other in the order queued, as its event loop does "
                         "(EngineModel.client_sharing)")
    ap.add_argument("--tokenize-profile", metavar="ROUTING_JSON",
                    help="hold the ingress's loop for each chat prompt's inline tokenising (multiturn), at what a "
                         "routing JSON's py-spy profiles of its ingresses measured (ingress_fit.tokenize_hold)")
    ap.add_argument("--first-text", nargs="+", metavar="LOGS",
                    help="bench JSONs or log archives with per-request records (run.py --per-request): the share of "
                         "token-id prompts whose first token decoded to no text, so that their TTFT is their second "
                         "token's (text_fit.first_text, EngineModel.empty_first_share)")
    ap.add_argument("--ray-reply", action="store_true",
                    help="set ray_reply_s (Serve's reply to a send, after the replica took it: when the Ray twin "
                         "inserts the prompt and learns the replica's count) from the routing JSON's decision-to-"
                         "insert times of Ray's router, less the fitted replica front end (ingress_fit.ray_reply)")
    ap.add_argument("--start", action="append", default=[], metavar="FIELD=VALUE",
                    help="start the routing fit's free FIELD at VALUE instead of where the serving fit carries it "
                         "(repeatable; a coordinate search moves one field at a time, so two fields that trade "
                         "against each other are found together only from a start near both)")
    ap.add_argument("--hold", action="append", default=[], metavar="FIELD=VALUE",
                    help="set the routing fit's free FIELD to VALUE and keep it out of the fit: a quantity measured "
                         "apart (e.g. gpu_contention from benchmarks/gpu/colocated_contention.py); repeatable")
    ap.add_argument("--shape-bounds", action="store_true",
                    help="keep the routing fit's context terms near the start (SHAPE_BOUNDS)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/sim_calibration.json")
    args = ap.parse_args(argv)
    if args.graph_tokens < 0:
        ap.error(f"--graph-tokens {args.graph_tokens}: a token count is >= 0 (0: off)")
    graph_step_s = None
    if args.graph_step_ms is not None:
        if not args.graph_tokens:
            ap.error("--graph-step-ms is the surcharge of a step within --graph-tokens: give --graph-tokens N (N > 0)")
        graph_step_s = None if args.graph_step_ms == "fit" else args.graph_step_ms / 1e3
        if graph_step_s is not None and not graph_step_s >= 0:
            ap.error(f"--graph-step-ms {args.graph_step_ms}: a surcharge is >= 0 ms")
    t0 = time.perf_counter()
    over = json.loads(Path(args.overhead).read_text())
    tier = json.loads(Path(args.kv_tier).read_text()) if args.kv_tier else None
    gbps = float(tier["effective_load_gbps"]) if tier else args.tier_gbps
    base = EngineModel(kv_blocks=args.kv_blocks, chunk_tokens=args.chunk_tokens,
                       async_scheduling=args.async_scheduling == "on", **({"tier_gbps": gbps} if gbps else {}))
    step_fit = None
    try:
        if args.prefill_step_ms == "fit":
            _, step_fit, (engine, inputs) = fit_prefill_step(over, model_shape=args.model_shape, base=base,
                                                             ingresses=args.ingresses)
        else:
            engine, inputs = fit_serving(over, model_shape=args.model_shape, base=base, ingresses=args.ingresses,
                                         prefill_step_s=args.prefill_step_ms / 1e3)
    except ValueError as err:
        ap.error(f"--prefill-step-ms {args.prefill_step_ms}: {err}")
    if step_fit:
        inputs["prefill_step_fit"] = step_fit
    tier_fit, floor = None, (0.0, 0.0)
    if tier:
        fl = fit_engine_floor(engine, tier)
        if fl:
            floor = (round(fl[0], 6), round(fl[1], 7))
        hit_s, how = fit_tier_hit_s(engine, tier, floor)
        engine = engine.with_(tier_hit_s=round(hit_s, 6))
        tier_fit = {"tier_gbps": gbps, "tier_hit_s": engine.tier_hit_s, "tier_hit_s_how": how,
                    "engine_floor": fl and {"input_s_per_request": floor[0], "input_s_per_ktok": floor[1],
                                            "how": fl[2]},
                    "chunk_tokens": LLM_CLASS_CHUNK_TOKENS}
    rows = serving_residuals(over, engine, inputs["request_overhead_s"], inputs["stage_split"])
    unsplit = serving_residuals(over, engine, inputs["request_overhead_s"]) if inputs["stage_split"] else []
    tested = [r for r in rows if not r["by_construction"]]
    doc = {
        "schema": "kvserve.sim_calibration/2",
        "command": shlex.join(["python", "-m", "benchmarks.simulator.calibrate",
                               *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(), "git_commit": git_commit(),
        "sources": {"overhead": args.overhead, "overhead_machine": over.get("machine"),
                    "overhead_git_commit": over.get("git_commit"), "kv_tier": args.kv_tier,
                    "tier_gbps": gbps, "tier_source": args.kv_tier or args.tier_source, "routing": args.routing,
                    "routing_repeats": args.routing_repeats},
        "engine": engine.to_dict(), "serving_fit": inputs, "tier_fit": tier_fit, "serving_residuals": rows,
        "serving_residuals_unsplit": [r for r in unsplit if r["system"] in inputs["stage_split"]],
        "serving_tested_cells": len(tested),
        "serving_ttft_p50_within_25pct": sum(abs(r["ttft_p50_ms_error"]) <= 0.25 for r in tested),
    }
    print(serving_table(rows))
    if unsplit:
        print("without the stage split (kvserve's overhead as in the engine written):")
        print(serving_table([r for r in unsplit if r["system"] in inputs["stage_split"]]))
    check = None
    if tier:
        check = (int(tier["prefix_tokens"]), float(tier["ttft_recompute_ms"]), float(tier["ttft_tier_hit_ms"]))
    elif args.tier_check:
        p, r, h = args.tier_check.split(":")
        check = (int(p), float(r), float(h))
    if check:
        floors = {"gpu_cache_hit_ms": tier.get("ttft_gpu_cache_hit_ms"),
                  "short_prompt_ms": tier.get("ttft_short_prompt_ms")} if tier else {}
        doc["tier"] = tier_row(engine, prefix_tokens=check[0], recompute_ms=check[1], tier_hit_ms=check[2],
                               source=args.kv_tier or args.tier_source, floor=floor, **floors)
        # the hit is matched by construction when its fixed cost is fitted from it, or when every part of
        # it is a measured floor (the front end through both floors, the cost from the GPU-cache hit and
        # the timed load; the copy is then modelled at the load's own GB/s)
        doc["tier"]["tier_hit_by_construction"] = (tier_fit is None
                                                   or tier_fit["tier_hit_s_how"].startswith("from the hit")
                                                   or bool(tier_fit["engine_floor"]))
        if engine.tier_hit_s:  # what the copy alone gives
            bare = tier_row(engine.with_(tier_hit_s=0.0), prefix_tokens=check[0], recompute_ms=check[1],
                            tier_hit_ms=check[2], source="", floor=floor)
            doc["tier"].update(sim_tier_hit_ms_without_hit_cost=bare["sim_tier_hit_ms"],
                               tier_hit_error_without_hit_cost=bare["tier_hit_error"])
        if floor != (0.0, 0.0):  # the cell as before the floor: no front end
            bare = tier_row(engine, prefix_tokens=check[0], recompute_ms=check[1], tier_hit_ms=check[2], source="")
            doc["tier"].update(sim_tier_hit_ms_without_floor=bare["sim_tier_hit_ms"],
                               sim_recompute_ms_without_floor=bare["sim_recompute_ms"])
        print(json.dumps(doc["tier"]))
    if args.routing:
        routing = json.loads(Path(args.routing).read_text())
        settings = routing["scale_settings"]
        try:
            cells = with_repeats(routing, [(f, json.loads(Path(f).read_text())) for f in args.routing_repeats])
        except ValueError as err:  # a copy of another load, scale, config or GPU
            ap.error(f"--routing-repeats {err}")
        if args.split_load:
            cells = with_split_load(cells)
        kw = settings.get("engine_kwargs", {})
        # kvserve's form (its ingress work on one shared core per ingress, the rest a constant), the routing run's shape
        split = inputs["stage_split"].get("kvserve", {})
        start = for_shape(engine, args.model_shape, args.routing_model_shape).with_(
            replicas_per_gpu=args.replicas, kv_blocks=int(kw.get("num_gpu_blocks_override", args.kv_blocks)),
            kv_admission="num_gpu_blocks_override" in kw,
            **{k: split[k] for k in ("input_s_per_request", "request_overhead_s") if k in split},
            **(ingress_work(split, inputs["input_len"]) if args.ingress_work == "split"
               else {k: split[k] for k in ("frontend_s_per_request",) if k in split}))
        if args.frontend == "loop":
            start = start.with_(frontend_sharing="loop", frontend_hops=args.frontend_hops,
                                frontend_merge_busy=args.frontend_merge_busy)
        start = start.with_(ingress_balance=args.ingress_balance)
        client = (fit_client(client_rows(args.client_logs), cores=max(c.client_processes for c in cells))
                  if args.client_logs else None)
        if client:  # each cell is simulated with its own bench processes; the engine written keeps the most
            start = start.with_(client_s_per_request=client["client_s_per_request"],
                                client_s_per_token=client["client_s_per_token"], client_cores=client["cores"])
        if args.client_sharing != "ps":
            start = start.with_(client_sharing=args.client_sharing)
        if args.prefill_step_apart:
            start = start.with_(prefill_step_contends=False)
        if args.graph_tokens:
            start = start.with_(graph_tokens=args.graph_tokens)
        if graph_step_s is not None:
            start = start.with_(graph_step_s=graph_step_s)
        tok = tokenize_hold(json.loads(Path(args.tokenize_profile).read_text())) if args.tokenize_profile else None
        if tok:
            start = start.with_(tokenize_hold_s=tok["tokenize_hold_s"])
        text = first_text(args.first_text) if args.first_text else None
        if text:
            start = start.with_(empty_first_share=text["empty_first_share"])
        ingress = fit_ingress(ingress_rows(routing)) if args.ingress_cpu else None
        if ingress:
            start = start.with_(**{k: ingress[k] for k in INGRESS_FIELDS})
        tree = tree_call_costs(json.loads(Path(args.tree_cost).read_text())) if args.tree_cost else None
        if tree:
            start = start.with_(**{k: tree[k] for k in TREE_FIELDS})
        capacity = json.loads(Path(args.ingress_capacity).read_text()) if args.ingress_capacity else None
        bounds = {**frontend_bounds(split, capacity, args.ingress_work), **ENGINE_BOUNDS,
                  **(shape_bounds(start) if args.shape_bounds else {})}
        routing_free = ROUTING_FREE
        at = ROUTING_FREE.index("gpu_contention") + 1  # beside it, where the coordinate search visits them
        extra = (("prefill_contention",) if args.prefill_contention else ()) + (
            ("decoding_peer_share",) if args.decoding_peer_share else ())
        routing_free = (*ROUTING_FREE[:at], *extra, *ROUTING_FREE[at:])
        free = (tuple(k for k in routing_free if not (ingress and k in INGRESS_FIELDS))
                + (("decode_s_per_seq",) if args.decode_per_seq else ())
                + (("prefill_step_s", "input_s_per_request") if args.engine_stage else ())
                + (("graph_step_s",) if args.graph_step_ms == "fit" else ())
                + (("request_overhead_s",) if client else ()))
        if client:  # the c=1 rest held the serving run's client; this client is modelled: the rest may only shrink
            bounds["request_overhead_s"] = (1e-4, max(start.request_overhead_s, 1e-4))
        held = fit_start(args.hold, free, option="--hold")
        free = tuple(k for k in free if k not in held)
        start = start.with_(**fit_start(args.start, free), **held)
        fitted, info = fit([c for c in cells if c.strategy == "round-robin"], start, settings,
                           args.replicas, rounds=args.rounds, free=free, bounds=bounds,
                           engine_stage=args.engine_stage, log=lambda m: print(m, file=sys.stderr))
        info.update(start=start.to_dict(), free=list(free), model_shape=args.routing_model_shape, bounds=bounds,
                    ingress_work=args.ingress_work,
                    ingress_capacity=args.ingress_capacity,
                    ingress_cpu_costs=(capacity or {}).get("cost_fit", {}).get("ingress"),
                    schema=routing.get("schema"))
        reply = ray_reply(routing, fitted.input_s(0)) if args.ray_reply else None
        if reply:  # round-robin's cells, the fit's, have no Ray router: set after the fit, for the residuals
            fitted = fitted.with_(ray_reply_s=reply["ray_reply_s"])
        rrows = residuals(cells, fitted, settings, args.replicas)
        order = ordering(rrows)
        doc["routing"] = {"machine": routing.get("machine"), "engine": fitted.to_dict(), "fit": info,
                          "residuals": rrows,
                          "client_fit": client and dict(client, sources=args.client_logs),
                          "ingress_fit": ingress, "tokenize_fit": tok and dict(tok, file=args.tokenize_profile),
                          "first_text_fit": text and dict(text, sources=args.first_text),
                          "tree_call_fit": tree and dict(tree, file=args.tree_cost),
                          "ray_reply_fit": reply,
                          "ordering": order,
                          "ordering_pairs_apart": sum(o["pairs_apart"] for o in order.values()),
                          "ordering_pairs_same_order": sum(o["pairs_same_order"] for o in order.values()),
                          "modelled_cells": sum(r["modelled"] for r in rrows),
                          "modelled_within_25pct": sum(r["modelled"] and abs(r["ttft_p50_error"]) <= 0.25
                                                       for r in rrows),
                          "open_loop_cells": sum(not r["closed_loop"] for r in rrows),
                          "open_loop_within_25pct": sum(not r["closed_loop"] and abs(r["ttft_p50_error"]) <= 0.25
                                                        for r in rrows)}
        print(residual_table(rrows))
        print(engine_parts_table(rrows))
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
