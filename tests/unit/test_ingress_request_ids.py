"""The prompts of a batched completion get distinct Serve internal request ids (Serve's router indexes by it)."""

from __future__ import annotations

import asyncio

from ray.serve import context as serve_context

from deployments.generation import merge
from deployments.ingress import _own_serve_request_id
from deployments.protocol import GenerateChunk


def _internal_id() -> str:
    return serve_context._get_serve_request_context()._internal_request_id


def test_each_prompt_task_gets_its_own_id_and_the_request_keeps_its_own() -> None:
    async def main() -> tuple[str, list[str], str]:
        serve_context._set_request_context(request_id="http-req", _internal_request_id="parent")
        seen: list[str] = []

        async def prompt_stream(k: int):
            _own_serve_request_id()
            seen.append(_internal_id())
            assert serve_context._get_serve_request_context().request_id == "http-req"  # logging id kept
            yield GenerateChunk(texts={0: str(k)})

        out = [offset async for offset, _ in merge([prompt_stream(k) for k in range(8)], n=1)]
        assert sorted(out) == [0, 1, 2, 3, 4, 5, 6, 7]
        return "parent", seen, _internal_id()

    parent, seen, after = asyncio.run(main())
    assert len(set(seen)) == 8 and parent not in seen
    assert after == parent
