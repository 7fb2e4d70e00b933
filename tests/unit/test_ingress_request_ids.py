"""The prompts of a batched completion get distinct Serve internal request ids (Serve's router indexes by it)."""

from __future__ import annotations

import asyncio

from ray.serve import context as serve_context

from deployments.generation import merge
from deployments.protocol import GenerateChunk


def _internal_id() -> str:
    # read-only look at Serve's request context, to observe what a handle call made here would carry
    return serve_context._get_serve_request_context()._internal_request_id


def test_each_prompt_of_a_batch_runs_outside_the_http_request_context() -> None:
    async def main() -> tuple[list[str], str]:
        serve_context._set_request_context(request_id="http-req", _internal_request_id="parent")
        seen: list[str] = []

        async def prompt_stream(k: int):
            seen.append(_internal_id())  # "" -> the handle generates a fresh id for this prompt's call
            yield GenerateChunk(texts={0: str(k)})

        out = [offset async for offset, _ in merge([prompt_stream(k) for k in range(8)], n=1)]
        assert sorted(out) == [0, 1, 2, 3, 4, 5, 6, 7]
        return seen, _internal_id()

    seen, after = asyncio.run(main())
    assert seen == [""] * 8  # none inherits the HTTP request's id
    assert after == "parent"  # and the request keeps its own


def test_a_single_prompt_keeps_the_request_context() -> None:
    async def main() -> list[str]:
        serve_context._set_request_context(request_id="http-req", _internal_request_id="parent")
        seen: list[str] = []

        async def prompt_stream():
            seen.append(_internal_id())
            yield GenerateChunk(texts={0: "x"})

        [_ async for _ in merge([prompt_stream()], n=1)]
        return seen

    assert asyncio.run(main()) == ["parent"]
