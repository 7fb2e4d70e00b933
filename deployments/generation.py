"""Turning replica chunk streams into OpenAI responses.

Owns: ``Accumulator`` (per-request token/usage bookkeeping and the non-streaming response body),
``sse_events`` (the streaming body: chat or completion chunks, an optional usage chunk, then
``[DONE]``; errors after the stream started become an error event, never a dropped connection) and
``merge`` (several prompts of one batched completion request, interleaved as they produce output) and
``within`` (a request's deadline: ``ingress.request_timeout_s``).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from deployments.openai_api import (
    SSE_DONE,
    APIError,
    chat_chunk,
    completion_chunk,
    sse,
    usage,
    usage_chunk,
)
from deployments.protocol import GenerateChunk


@dataclass(slots=True)
class Accumulator:
    """Everything a request produced so far, across its prompts and choices."""

    chat: bool
    rid: str
    created: int
    model: str
    texts: dict[int, list[str]] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    replica_id: str | None = None
    show_cached: bool = True  # ingress.expose_cached_tokens

    def add(self, offset: int, chunk: GenerateChunk) -> None:
        if chunk.prompt_tokens is not None:
            self.prompt_tokens += chunk.prompt_tokens
            self.cached_tokens += chunk.cached_tokens or 0
            self.replica_id = chunk.replica_id
        for i, text in chunk.texts.items():
            self.texts.setdefault(offset + i, []).append(text)
        self.completion_tokens += sum(chunk.token_counts.values())
        for i, reason in chunk.finish_reasons.items():
            self.finish[offset + i] = _finish(reason)

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens if self.show_cached else None)

    def response(self, n_choices: int) -> dict[str, Any]:
        choices = []
        for i in range(n_choices):
            text = "".join(self.texts.get(i, []))
            reason = self.finish.get(i, "stop")
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


async def merge(streams: list[AsyncIterator[GenerateChunk]], n: int) -> AsyncIterator[tuple[int, GenerateChunk]]:
    """Interleave the streams of a batch; yield (choice offset, chunk). One stream needs no tasks.

    Each stream of a batch runs in a task with an empty ``contextvars.Context``: outside the HTTP request's
    Serve request context, so the deployment handle gives each prompt's call its own request ids (Serve's
    request router indexes pending requests by that id; copies of the HTTP request's would collide).
    """
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(k: int, stream: AsyncIterator[GenerateChunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((k * n, chunk))
        except BaseException as err:  # noqa: BLE001 - forwarded to the consumer
            await queue.put(err)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(k, s), context=contextvars.Context()) for k, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


async def within(stream: AsyncIterator[Any], seconds: float) -> AsyncIterator[Any]:
    """Yield from ``stream`` until it ends; past ``seconds`` in all, close it and raise a 504 APIError.

    Closing the stream cancels the replica call, which aborts the request in the engine: a request
    never outlives ``ingress.request_timeout_s``, the bound that shutdown grace periods are sized by.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    it = aiter(stream)
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await anext(it)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise APIError(504, f"the request took longer than request_timeout_s={seconds:g}s and was stopped",
                               type_="timeout_error", code="request_timeout") from None
            yield item
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


async def sse_events(acc: Accumulator, chunks: AsyncIterator[tuple[int, GenerateChunk]], n_choices: int,
                     include_usage: bool, on_first: Any, on_error: Any) -> AsyncIterator[str]:
    """The SSE body of a streaming response."""
    started: set[int] = set()
    try:
        async for offset, chunk in chunks:
            if on_first is not None:
                on_first()
                on_first = None
            acc.add(offset, chunk)
            indexes = sorted({offset + i for i in (*chunk.texts, *chunk.finish_reasons)})
            for i in indexes:
                text = chunk.texts.get(i - offset, "")
                reason = chunk.finish_reasons.get(i - offset)
                reason = _finish(reason) if reason is not None else None
                if acc.chat:
                    if i not in started:
                        started.add(i)
                        yield sse(chat_chunk(acc.rid, acc.created, acc.model, i,
                                             {"role": "assistant", "content": ""}, None))
                    delta = {"content": text} if text else {}
                    yield sse(chat_chunk(acc.rid, acc.created, acc.model, i, delta, reason))
                else:
                    yield sse(completion_chunk(acc.rid, acc.created, acc.model, i, text, reason))
        if include_usage:
            obj = "chat.completion.chunk" if acc.chat else "text_completion"
            yield sse(usage_chunk(acc.rid, acc.created, acc.model, obj, acc.usage()))
    except APIError as err:
        on_error(err)
        yield sse(err.body())
    except Exception as err:  # noqa: BLE001 - a stream always ends with an error event and [DONE]
        api_err = APIError(500, f"the stream failed: {type(err).__name__}", type_="server_error", code="stream_failed")
        on_error(api_err)
        yield sse(api_err.body())
    yield SSE_DONE
