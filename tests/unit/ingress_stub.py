"""The real ingress FastAPI app over a stub replica handle: no Ray cluster, no engine.

Owns: ``stub_ingress`` (an ``Ingress`` built from configs/cpu.yaml plus overrides, with the SmolLM2
tokenizer and a ``StubHandle`` for the model; Serve's replica context is patched so the routes find
the instance) and ``StubHandle`` (streams a fixed answer, or fails the way a replica does). Used by
the auth, overload and fuzz tests; tests that need it are skipped when SmolLM2 is not prepared.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from deployments.protocol import GenerateChunk, GenerateRequest, ReplicaTiming

ROOT = Path(__file__).resolve().parents[2]


INGRESS_DEPLOYMENT = "Ingress"


class StubHandle:
    """A deployment handle whose ``generate.remote`` streams ``words``, or raises ``fail(attempt)`` after
    ``fail_after`` chunks; ``gap_s`` between chunks. Each call records whether it was cancelled.

    ``validate_sampling``: check the request's ``SamplingParams`` as the replica does, and raise what it raises.
    ``pieces``: the answer's text, one token per piece; each token gets logprobs when the request asks.
    ``timing``: called with the request, it gives the first chunk's ``ReplicaTiming`` (default: none).
    """

    deployment_name = "vllm-stub"

    def __init__(self, words: int = 3, cached_tokens: int = 0, validate_sampling: bool = False) -> None:
        self.words, self.cached_tokens, self.validate_sampling = words, cached_tokens, validate_sampling
        self.fail: Callable[[int], BaseException | None] = lambda attempt: None
        self.fail_after, self.gap_s = 0, 0.0
        self.pieces: list[str] | None = None  # the answer, one token per piece (default " w0", " w1", ...)
        self.finish_reason = "length"
        self.timing: Callable[[GenerateRequest], ReplicaTiming | None] = lambda req: None
        self.calls: list[_Call] = []
        self.requests: list[GenerateRequest] = []
        self.generate = SimpleNamespace(remote=self._remote)

    def options(self, **_: Any) -> StubHandle:
        return self

    def _remote(self, req: GenerateRequest) -> _Call:
        self.requests.append(copy.deepcopy(req))
        call = _Call(self._stream(req, len(self.requests) - 1))
        self.calls.append(call)
        return call

    async def _stream(self, req: GenerateRequest, attempt: int) -> AsyncIterator[GenerateChunk]:
        err = self.fail(attempt)
        if err is not None and self.fail_after == 0:
            raise err
        if self.validate_sampling:
            from deployments.engine import sampling_params

            sampling_params(req)
        n = req.sampling.n
        pieces = self.pieces if self.pieces is not None else [f" w{i}" for i in range(self.words)]
        pieces = pieces[:req.sampling.max_tokens]
        top = req.sampling.logprobs
        for i, piece in enumerate(pieces):
            if err is not None and i == self.fail_after:
                raise err
            if self.gap_s:
                await asyncio.sleep(self.gap_s)
            last = i == len(pieces) - 1
            lps = {c: [[(100 + i, -0.5, piece)] + [(200 + j, -1.0 - j, f"alt{j}") for j in range(top)]]
                   for c in range(n)} if top is not None else {}
            yield GenerateChunk(
                texts={c: piece for c in range(n)}, token_counts={c: 1 for c in range(n)},
                token_ids={c: [100 + i] for c in range(n)}, logprobs=lps,
                finish_reasons={c: self.finish_reason for c in range(n)} if last else {},
                prompt_tokens=len(req.prompt_token_ids) if i == 0 else None,
                cached_tokens=self.cached_tokens if i == 0 else None, replica_id="r0" if i == 0 else None,
                timing=self.timing(req) if i == 0 else None)


class _Call:
    """A streaming call, like Serve's DeploymentResponseGenerator: async-iterable, with ``cancel()``."""

    def __init__(self, gen: AsyncIterator[GenerateChunk]) -> None:
        self._gen, self.cancelled = gen, False

    def __aiter__(self) -> _Call:
        return self

    async def __anext__(self) -> GenerateChunk:
        return await anext(self._gen)

    def cancel(self) -> None:
        self.cancelled = True


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def stub_ingress(monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any] | None = None,
                 handle: StubHandle | None = None):
    """(FastAPI app, Ingress instance, handle) for configs/cpu.yaml + ``overrides``."""
    from serve_app.settings import model_dir

    doc = yaml.safe_load((ROOT / "configs/cpu.yaml").read_text())
    args = _merge(doc["applications"][0]["args"], overrides or {})
    model_path = model_dir() / args["models"][0]["path"]
    if not (model_path / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 is not prepared under {model_path} (kvserve prepare-model)")
    from ray import serve

    from deployments import ingress as ingress_mod

    handle = handle or StubHandle()
    cls = next(c for c in ingress_mod.Ingress.__mro__ if "_requests" in c.__dict__)  # the class Serve wraps
    obj = cls.__new__(cls)
    context = SimpleNamespace(servable_object=obj, app_name="kvserve", deployment=INGRESS_DEPLOYMENT,
                              replica_id=SimpleNamespace(unique_id="ingress-stub"))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    running = {StubHandle.deployment_name: SimpleNamespace(status="HEALTHY", replica_states={"RUNNING": 1})}
    # Serve's ingress decorator copies the class's module globals: patch the copy its methods read.
    code_globals = cls.__init__.__globals__
    monkeypatch.setitem(code_globals, "serve_status_source", lambda app_name: lambda: running)  # every model serves
    monkeypatch.setitem(code_globals, "metrics", lambda: _NullMetrics())
    cls.__init__(obj, args, {m["id"]: handle for m in args["models"]})
    obj._readiness.refresh(0.0)
    return ingress_mod.app, obj, handle


class _NullMetric:
    def __getattr__(self, _: str) -> Callable[..., None]:
        return lambda *a, **k: None


class _NullMetrics:
    def __getattr__(self, _: str) -> _NullMetric:
        return _NullMetric()
