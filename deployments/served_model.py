"""One served model inside an ingress replica, and the metrics of one request to it.

Owns ``ServedModel`` (a model's config, vLLM front end, deployment handle, block hasher, preparation thread and
the engine block size learned from responses) and ``RequestTracker`` (per request: concurrency, TTFB, latency,
token counts and outcome in ``deployments.metrics``; the end of its stage timings). The ingress
(``deployments.ingress``) holds one ``ServedModel`` per configured model and a tracker per request.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from deployments.generation import Accumulator
from deployments.metrics import metrics
from deployments.openai_api import APIError
from deployments.rejections import status_label
from deployments.rendering import Frontend
from deployments.stages import RequestStages
from routers.hashing import BlockHasher
from serve_app.config import ModelConfig


@dataclass
class ServedModel:
    config: ModelConfig
    frontend: Frontend  # vLLM's rendering, tokenizer, parsers and sampling defaults for this model
    handle: Any
    hasher: BlockHasher | None  # None: the routing strategy needs no block hashes
    prep: ThreadPoolExecutor  # the one thread that prepares long prompts
    block_size: int = 0  # the engine's, learned from the first response (0: the router hashes)
    inflight: int = 0
    hash_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # loop and prep thread

    @property
    def max_model_len(self) -> int:
        return self.frontend.max_model_len

    def hashes(self, ids: list[int], salt: str | None) -> tuple[int, ...]:
        if self.hasher is None or not self.block_size:
            return ()
        with self.hash_lock:
            return tuple(self.hasher(ids, self.block_size, salt=salt))


class RequestTracker:
    """Request metrics: concurrency, TTFB, latency, tokens, outcome."""

    def __init__(self, m: ServedModel, start: float, stages: RequestStages) -> None:
        self._m, self._start, self._status, self._first = m, start, "success", False
        self.stages = stages
        self.on_done: Any = None  # called with the Accumulator when the request ends (token limits)
        m.inflight += 1
        metrics().concurrent.set(m.inflight, tags={"model": m.config.id})

    def first(self) -> None:
        if not self._first:
            self._first = True
            ms = (time.perf_counter() - self._start) * 1000
            metrics().ttfb_ms.observe(ms, tags={"model": self._m.config.id, "status": "success"})
            self.stages.first_byte()

    def error(self, err: APIError) -> None:
        self._status = status_label(err.status)
        err.counted = True

    def cancelled(self) -> None:
        self._status = "cancelled"

    async def wrap(self, events: AsyncIterator[str], acc: Accumulator) -> AsyncIterator[str]:
        try:
            async for e in events:
                yield e
        except BaseException:
            self.cancelled()
            raise
        finally:
            self.done(acc)

    def done(self, acc: Accumulator) -> None:
        m, model = metrics(), self._m.config.id
        self.stages.end(self._status)
        self._m.inflight -= 1
        m.concurrent.set(self._m.inflight, tags={"model": model})
        tags = {"model": model, "status": self._status}
        m.invocations.inc(1, tags=tags)
        m.latency_ms.observe((time.perf_counter() - self._start) * 1000, tags=tags)
        for counter, value in ((m.prompt_tokens, acc.prompt_tokens), (m.cached_tokens, acc.cached_tokens),
                               (m.completion_tokens, acc.completion_tokens)):
            if value > 0:  # ray.util.metrics rejects inc(0)
                counter.inc(value, tags={"model": model})
        if self.on_done is not None:
            self.on_done(acc)
