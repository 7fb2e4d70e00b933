"""A fake ``deployments.engine.Engine``: the serving path without vLLM, for fast CPU tests and overhead runs.

Owns ``FakeEngine``. Select it with ``models[].engine_class: tests.fakes.engine:FakeEngine``. It answers
every request with ``max_tokens`` tokens (" w0", " w1", ...; ``n`` choices), one per step, or with the text of
``engine_kwargs.fake_text`` (a few characters per token, finishing with "stop"), sleeping
``engine_kwargs.fake_step_s`` seconds before each step (default 0) and ``fake_prefill_s_per_token`` per
uncached prompt token before the first. It keeps a prefix cache of whole blocks (``block_size`` 16) so
``num_cached_tokens`` behaves like vLLM's for repeated prefixes. Outputs have vLLM's ``RequestOutput`` shape.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from deployments.engine import EngineStats
from deployments.protocol import GenerateRequest

BLOCK_SIZE = 16


@dataclass
class _Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class _Output:
    outputs: list[_Completion]
    num_cached_tokens: int
    finished: bool
    request_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class FakeEngine:
    """Deterministic engine with a bounded block prefix cache."""

    def __init__(self, step_s: float = 0.0, prefill_s_per_token: float = 0.0, num_blocks: int = 4096,
                 text: str | None = None) -> None:
        self.stats = EngineStats(block_size=BLOCK_SIZE, num_gpu_blocks=num_blocks)
        self.kv_events_endpoint: str | None = None
        self.client_errors: tuple[type[BaseException], ...] = (ValueError,)
        self.dead_errors: tuple[type[BaseException], ...] = (ConnectionError,)
        self._step_s, self._prefill_s = step_s, prefill_s_per_token
        self._pieces = [text[i:i + 4] for i in range(0, len(text), 4)] if text else None
        self._cache: OrderedDict[tuple, None] = OrderedDict()
        self._max_blocks = num_blocks
        self._aborted: set[str] = set()
        self.errored, self.dead_error = False, None

    @classmethod
    async def create(cls, model: Any, app: Any) -> FakeEngine:
        kw = model.engine_kwargs
        return cls(float(kw.get("fake_step_s", 0.0)), float(kw.get("fake_prefill_s_per_token", 0.0)),
                   text=kw.get("fake_text"))

    def _cached_tokens(self, ids: list[int], salt: str | None) -> int:
        hit, parent = 0, (salt,)
        full = len(ids) // BLOCK_SIZE
        for b in range(full):
            key = (parent, tuple(ids[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE]))
            if key in self._cache and hit == b * BLOCK_SIZE:
                hit += BLOCK_SIZE
                self._cache.move_to_end(key)
            else:
                self._cache[key] = None
            parent = key
        while len(self._cache) > self._max_blocks:
            self._cache.popitem(last=False)
        return min(hit, len(ids) - 1) if hit else 0

    async def generate(self, req: GenerateRequest) -> AsyncIterator[_Output]:
        s = req.sampling  # vLLM's SamplingParams from the ingress, or a dict of its keyword arguments
        get = s.get if isinstance(s, dict) else lambda name, default=None: getattr(s, name, default)
        n, max_tokens = int(get("n", 1) or 1), int(get("max_tokens") or 16)
        cached = self._cached_tokens(req.prompt_token_ids, req.cache_salt)
        self.stats.num_running += 1
        try:
            if self._prefill_s:
                await asyncio.sleep(self._prefill_s * (len(req.prompt_token_ids) - cached))
            pieces = self._pieces[:max_tokens] if self._pieces else [f" w{step}" for step in range(max_tokens)]
            done = "stop" if self._pieces and len(pieces) == len(self._pieces) else "length"
            for step, piece in enumerate(pieces):
                if self._step_s:
                    await asyncio.sleep(self._step_s)
                else:
                    await asyncio.sleep(0)
                if req.request_id in self._aborted:
                    return
                last = step == len(pieces) - 1
                outs = [_Completion(i, piece, [step], done if last else None) for i in range(n)]
                yield _Output(outs, cached, last, req.request_id)
        finally:
            self.stats.num_running -= 1
            self._aborted.discard(req.request_id)

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    async def check_health(self) -> None:
        return None

    async def reset_prefix_cache(self) -> bool:
        self._cache.clear()
        return True

    def shutdown(self) -> None:
        return None
