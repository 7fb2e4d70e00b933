"""A paced fake engine for serving-path benchmarks: one shared step clock per replica, like an engine's steps.

Owns ``StepClockEngine`` (a ``deployments.engine.Engine``; select it with ``models[].engine_class:
benchmarks.step_engine:StepClockEngine``). Every ``engine_kwargs.step_ms`` the clock ticks once and each
active stream gets one new token (" w0", " w1", ...) until ``max_tokens``, so the real ``VLLMReplica``
around it streams one ``GenerateChunk`` per step per stream, exactly as over vLLM. A request's first output
comes with the first tick after it arrives (plus ``prefill_ms_per_1k`` per 1,000 prompt tokens, default 0).
When the replica's event loop is late the clock does not catch up: the next step starts when the late
one ran, so ``steps kept / steps due`` and the summed lateness measure the replica's pacing.

The clock writes its counters (pid, steps, summed lateness, tokens, active streams) to
``<engine_kwargs.counters_dir>/<pid>.json`` every ``COUNTERS_EVERY_S`` when that is set: a benchmark reads
them from outside the replica. No KV events (``kv_events_endpoint`` is None): a kv-aware router keeps only
its approximate index. ``EngineStats`` report the running streams and a KV usage from their prompt blocks.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.engine import EngineStats
from deployments.protocol import GenerateRequest

BLOCK_SIZE = 16
COUNTERS_EVERY_S = 0.25


@dataclass(slots=True)
class _Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: Any = None


@dataclass(slots=True)
class _Output:
    outputs: list[_Completion]
    num_cached_tokens: int
    finished: bool
    prompt_logprobs: Any = None


class StepClockEngine:
    """Fake engine: every ``step_s`` one token for each active stream."""

    def __init__(self, step_s: float, prefill_s_per_token: float = 0.0, num_blocks: int = 65536,
                 counters_dir: str | None = None) -> None:
        self.stats = EngineStats(block_size=BLOCK_SIZE, num_gpu_blocks=num_blocks)
        self.kv_events_endpoint: str | None = None
        self.client_errors: tuple[type[BaseException], ...] = (ValueError,)
        self.dead_errors: tuple[type[BaseException], ...] = (ConnectionError,)
        self.errored, self.dead_error = False, None
        self._step_s, self._prefill_s = step_s, prefill_s_per_token
        self._counters = Path(counters_dir) / f"{os.getpid()}.json" if counters_dir else None
        self._tick = asyncio.Event()
        self._steps = 0
        self._late_s = 0.0
        self._tokens = 0
        self._blocks = 0  # prompt blocks of the active streams
        self._aborted: set[str] = set()
        self._clock = asyncio.get_running_loop().create_task(self._run_clock())

    @classmethod
    async def create(cls, model: Any, app: Any) -> StepClockEngine:
        kw = model.engine_kwargs
        return cls(float(kw.get("step_ms", 20.0)) / 1000, float(kw.get("prefill_ms_per_1k", 0.0)) / 1e6,
                   counters_dir=kw.get("counters_dir"))

    async def _run_clock(self) -> None:
        due = time.perf_counter()
        written = 0.0
        while True:
            due += self._step_s
            await asyncio.sleep(max(due - time.perf_counter(), 0.0))
            now = time.perf_counter()
            if now > due:
                self._late_s += now - due
                due = now  # a late step delays the next one: no catching up
            self._steps += 1
            self.stats.last_step = time.monotonic()
            tick, self._tick = self._tick, asyncio.Event()
            tick.set()
            if self._counters is not None and now - written >= COUNTERS_EVERY_S:
                written = now
                self._write_counters()

    def _write_counters(self) -> None:
        body = {"pid": os.getpid(), "steps": self._steps, "late_s": round(self._late_s, 6), "tokens": self._tokens,
                "streams": self.stats.num_running, "time": time.time()}
        tmp = self._counters.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(self._counters)

    def _usage(self) -> None:
        self.stats.kv_usage = min(self._blocks / max(self.stats.num_gpu_blocks, 1), 1.0)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[_Output]:
        s = req.sampling  # vLLM's SamplingParams from the ingress, or a dict of its keyword arguments
        get = s.get if isinstance(s, dict) else lambda name, default=None: getattr(s, name, default)
        n, max_tokens = int(get("n", 1) or 1), int(get("max_tokens") or 16)
        blocks = len(req.prompt_token_ids) // BLOCK_SIZE + 1
        self.stats.num_running += 1
        self._blocks += blocks
        self._usage()
        try:
            if self._prefill_s:
                await asyncio.sleep(self._prefill_s * len(req.prompt_token_ids))
            for step in range(max_tokens):
                await self._tick.wait()
                if req.request_id in self._aborted:
                    return
                last = step == max_tokens - 1
                self._tokens += n
                yield _Output([_Completion(i, f" w{step}", [step], "length" if last else None) for i in range(n)],
                              0, last)
        finally:
            self.stats.num_running -= 1
            self._blocks -= blocks
            self._usage()
            self._aborted.discard(req.request_id)

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    async def check_health(self) -> None:
        return None

    async def reset_prefix_cache(self) -> bool:
        return True

    def shutdown(self) -> None:
        self._clock.cancel()
