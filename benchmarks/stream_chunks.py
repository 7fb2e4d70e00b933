"""Microbenchmark of the replica -> ingress streaming hop: what one streamed chunk costs, per transport.

Owns the measurement behind the replica's chunk pacing (``deployments/pacing.py``). No engine: a producer
deployment emulates an engine that emits one step for every active stream each ``--step-ms`` and yields a
``GenerateChunk`` per stream per step (or one per ``--merge`` steps); a consumer deployment (the ingress's
place) reads ``--streams`` concurrent streams through a deployment handle. Reported per variant: the step
rate the producer kept (a saturated process falls behind the step clock), the delay from a chunk's creation
to its arrival at the consumer (p50/p99), and CPU seconds per 1,000 chunks in each process.

Variants: ``--serialization`` (the handle's response serialization: cloudpickle, Serve's default, or pickle)
and ``--merge``. Ray starts locally with the fast-path environment unless ``--no-fast-path``.

    python benchmarks/stream_chunks.py --streams 64 --steps 200 --step-ms 8 --out /tmp/stream.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build(serve):
    from deployments.protocol import GenerateChunk, GenerateRequest

    @serve.deployment(max_ongoing_requests=1024)
    class Producer:
        """Emulated engine: every ``step_s`` one new token for each active stream."""

        def __init__(self) -> None:
            self._tick = asyncio.Event()
            self._steps = 0
            self._clock: asyncio.Task | None = None
            self._step_s = 0.008

        async def _run_clock(self) -> None:
            nxt = time.perf_counter()
            while True:
                nxt += self._step_s
                await asyncio.sleep(max(nxt - time.perf_counter(), 0))
                self._steps += 1
                self._tick.set()
                self._tick = asyncio.Event()

        async def reset(self, step_s: float) -> tuple[float, int]:
            self._step_s = step_s
            if self._clock is None:
                self._clock = asyncio.get_running_loop().create_task(self._run_clock())
            return _cpu_s(), self._steps

        async def cpu(self) -> tuple[float, int]:
            return _cpu_s(), self._steps

        async def generate(self, steps: int, merge: int, req=None):
            started = time.time()
            chunk = GenerateChunk(token_counts={0: 0}, texts={0: ""})
            chunk.timing = started  # the first chunk goes out at once: dispatch and return of one call
            yield chunk
            chunk = None
            for i in range(steps):
                await self._tick.wait()
                if chunk is None:
                    chunk = GenerateChunk()
                    chunk.token_counts[0] = 0
                    chunk.texts[0] = ""
                chunk.texts[0] += " tok"
                chunk.token_counts[0] += 1
                if (i + 1) % merge == 0 or i == steps - 1:
                    chunk.timing = time.time()  # creation stamp (the field is free in this benchmark)
                    yield chunk
                    chunk = None

    @serve.deployment(max_ongoing_requests=16)
    class Consumer:
        def __init__(self, producer) -> None:
            self._producer = producer

        async def run(self, streams: int, steps: int, step_s: float, merge: int, serialization: str,
                      prompt_tokens: int) -> dict:
            h = self._producer.options(stream=True, method_name="generate", request_serialization=serialization,
                                       response_serialization=serialization)
            p_cpu0, p_steps0 = await self._producer.reset.remote(step_s)
            delays: list[float] = []
            dispatch: list[float] = []
            first_back: list[float] = []
            chunks = 0

            async def one(k: int) -> None:
                nonlocal chunks
                req = GenerateRequest(request_id=f"r{k}", model_id="m", prompt_token_ids=list(range(prompt_tokens)),
                                      sampling={"max_tokens": steps, "temperature": 0.0},
                                      block_hashes=tuple(range(prompt_tokens // 16)))
                sent = time.time()
                first = True
                async for c in h.remote(steps, merge, req):
                    now = time.time()
                    if first:
                        dispatch.append(c.timing - sent)
                        first_back.append(now - c.timing)
                        first = False
                        continue
                    delays.append(now - c.timing)
                    chunks += 1

            c_cpu0, t0 = _cpu_s(), time.perf_counter()
            await asyncio.gather(*(one(k) for k in range(streams)))
            wall = time.perf_counter() - t0
            c_cpu = _cpu_s() - c_cpu0
            p_cpu1, p_steps1 = await self._producer.cpu.remote()
            delays.sort()
            return {
                "chunks": chunks, "wall_s": round(wall, 3),
                "steps_per_s_target": round(1 / step_s, 1),
                "steps_per_s_kept": round(steps / wall, 1),
                "chunks_per_s": round(chunks / wall, 1),
                "delay_ms_p50": round(1000 * delays[len(delays) // 2], 3),
                "delay_ms_p99": round(1000 * delays[int(len(delays) * 0.99)], 3),
                "delay_ms_mean": round(1000 * statistics.fmean(delays), 3),
                "dispatch_ms_p50": round(1000 * statistics.median(dispatch), 3),
                "first_chunk_return_ms_p50": round(1000 * statistics.median(first_back), 3),
                "producer_cpu_s_per_1k_chunks": round(1000 * (p_cpu1 - p_cpu0) / chunks, 4),
                "consumer_cpu_s_per_1k_chunks": round(1000 * c_cpu / chunks, 4),
                "producer_clock_steps": p_steps1 - p_steps0,
            }

    return Consumer.bind(Producer.bind())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=64, help="concurrent streams (1: the c=1 path)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--step-ms", type=float, default=8.0)
    ap.add_argument("--merge", default="1", help="comma list of steps per chunk")
    ap.add_argument("--serialization", default="cloudpickle,pickle")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=1024, help="token ids in each call's GenerateRequest")
    ap.add_argument("--no-fast-path", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from serve_app import settings

    if not args.no_fast_path:
        os.environ.update({k: v for k, v in settings.SERVE_FAST_PATH_ENV.items() if k != "RAY_SERVE_ENABLE_HA_PROXY"})
    import ray
    from ray import serve

    ray.init(num_cpus=max(os.cpu_count() or 2, 4), include_dashboard=False)
    runs: list[dict] = []

    async def drive() -> None:  # the fast path's handles route on the caller's event loop
        handle = serve.run(build(serve), name="stream_chunks", route_prefix=None)
        for _ in range(args.repeat):
            for ser in args.serialization.split(","):
                for merge in (int(m) for m in args.merge.split(",")):
                    r = await handle.run.remote(args.streams, args.steps, args.step_ms / 1000, merge, ser,
                                                args.prompt_tokens)
                    r.update(serialization=ser, merge=merge, streams=args.streams)
                    print(json.dumps(r), flush=True)
                    runs.append(r)

    try:
        asyncio.run(drive())
    finally:
        try:
            serve.shutdown()
        except RuntimeError:  # the fast path's handles lived on drive()'s loop, closed by now
            pass
        ray.shutdown()
    from benchmarks.bench.result import git_commit

    commit = git_commit()
    out = {"command": " ".join([sys.executable, *sys.argv]), "machine": platform.node(), "cpus": os.cpu_count(),
           "git_commit": commit, "fast_path": not args.no_fast_path, "runs": runs}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
