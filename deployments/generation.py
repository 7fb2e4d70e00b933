"""Turning replica chunk streams into OpenAI responses.

Owns: ``Accumulator`` (per-request usage bookkeeping, its choices (``deployments.choices``) and the
non-streaming response body), ``sse_events`` (the streaming body: chat or completion chunks, an optional
usage chunk, then
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

from deployments.choices import Choice, OutputSpec
from deployments.openai_api import SSE_DONE, APIError, chunk, sse, usage, usage_chunk
from deployments.protocol import GenerateChunk, PositionLogprobs


@dataclass(slots=True)
class Accumulator:
    """Everything a request produced so far, across its prompts and choices.

    ``spec`` says what the request asked of its output (parsers, logprobs, echo); None: plain text.
    """

    chat: bool
    rid: str
    created: int
    model: str
    spec: OutputSpec | None = None
    choices: dict[int, Choice] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[PositionLogprobs]] = field(default_factory=dict)  # prompt offset -> positions
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    replica_id: str | None = None
    show_cached: bool = True  # ingress.expose_cached_tokens

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = OutputSpec(chat=self.chat, request=None, tokenizer=None, parser=None, auto_tools=False,
                                   n=1, prompt_ids=[])

    def choice(self, i: int) -> Choice:
        c = self.choices.get(i)
        if c is None:
            c = self.choices[i] = Choice(self.spec, i)
        return c

    def count(self, offset: int, chunk: GenerateChunk) -> None:
        """Usage bookkeeping of a chunk (both paths)."""
        if chunk.prompt_tokens is not None:
            self.prompt_tokens += chunk.prompt_tokens
            self.cached_tokens += chunk.cached_tokens or 0
            self.replica_id = chunk.replica_id
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs[offset] = chunk.prompt_logprobs
        self.completion_tokens += sum(chunk.token_counts.values())

    def add(self, offset: int, chunk: GenerateChunk) -> None:
        """A chunk of a non-streaming request."""
        self.count(offset, chunk)
        for i in {*chunk.texts, *chunk.finish_reasons}:
            self.choice(offset + i).add(chunk.texts.get(i, ""), chunk.token_ids.get(i, ()),
                                        chunk.logprobs.get(i), chunk.finish_reasons.get(i))

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens if self.show_cached else None)

    def _prompt_logprobs(self, i: int) -> list[PositionLogprobs] | None:
        return self.prompt_logprobs.get(i - i % self.spec.n)

    def response(self, n_choices: int) -> dict[str, Any]:
        choices = [self.choice(i).final(self._prompt_logprobs(i)) for i in range(n_choices)]
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}


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


async def primed(stream: AsyncIterator[Any]) -> tuple[Any | None, AsyncIterator[Any]]:
    """``stream`` with its first item already awaited, and that item (None for an empty stream): an error before
    any output (overload, the engine refusing the request, the deadline) raises here, while the response's status
    and headers can still say so; after it, a stream ends with an error event instead. An empty stream stays
    empty."""
    it = aiter(stream)
    try:
        first = await anext(it)
    except StopAsyncIteration:
        first = _EMPTY

    async def rest() -> AsyncIterator[Any]:
        try:
            if first is _EMPTY:
                return
            yield first
            async for item in it:
                yield item
        finally:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                await aclose()

    return (None if first is _EMPTY else first), rest()


_EMPTY = object()


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
    obj = "chat.completion.chunk" if acc.chat else "text_completion"
    try:
        async for offset, part in chunks:
            if on_first is not None:
                on_first()
                on_first = None
            acc.count(offset, part)
            for k in sorted({*part.texts, *part.finish_reasons}):
                i = offset + k
                if acc.chat and i not in started:
                    started.add(i)
                    yield sse(chunk(acc.rid, acc.created, acc.model, obj, {
                        "index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}))
                choice = acc.choice(i).delta(part.texts.get(k, ""), part.token_ids.get(k, ()), part.logprobs.get(k),
                                             part.finish_reasons.get(k), acc.prompt_logprobs.get(offset))
                if choice is not None:
                    yield sse(chunk(acc.rid, acc.created, acc.model, obj, choice))
        if include_usage:
            yield sse(usage_chunk(acc.rid, acc.created, acc.model, obj, acc.usage()))
    except APIError as err:
        on_error(err)
        yield sse(err.body())
    except Exception as err:  # noqa: BLE001 - a stream always ends with an error event and [DONE]
        api_err = APIError(500, f"the stream failed: {type(err).__name__}", type_="server_error", code="stream_failed")
        on_error(api_err)
        yield sse(api_err.body())
    yield SSE_DONE
