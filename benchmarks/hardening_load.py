"""Client-side load and outcome accounting for benchmarks/hardening.py.

Owns: ``Outcomes`` (what clients saw: successes, failures of requests that had not started, mid-stream
failures with and without an error event, hangs) and ``steady_load`` (non-streaming and streaming client
loops until stopped), ``burst`` (N concurrent requests at once: status, latency, Retry-After) and
``burst_sequential`` (N one after another). Raw
HTTP (httpx) so that SSE error events, ``[DONE]`` and headers are seen exactly as sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Outcomes:
    ok: int = 0
    failed_not_streaming: int = 0  # non-streaming requests answered with an error (nothing had been sent)
    failed_streaming_unstarted: int = 0  # streams that failed before their first token
    midstream_with_error_event: int = 0  # streams that failed after tokens, ending with error event + [DONE]
    midstream_failures_without_error_event: int = 0  # streams cut without an error event or [DONE]
    hung_requests: int = 0  # no complete answer within the client deadline
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def _body(model: str, i: int, stream: bool, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "max_tokens": max_tokens, "stream": stream, "temperature": 0.7,
            "messages": [{"role": "user", "content": f"Request {i}: write a short note about the sea."}]}


def _error_code(r: httpx.Response) -> str:
    """The OpenAI error code of an error response; ``not_openai_shape`` for any other body (e.g. Serve's proxy's
    plain-text 503)."""
    try:
        return (r.json().get("error") or {}).get("code") or "no_code"
    except (ValueError, AttributeError):
        return "not_openai_shape"


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], out: Outcomes, deadline_s: float) -> None:
    try:
        async with asyncio.timeout(deadline_s):
            if not body["stream"]:
                r = await client.post(url, json=body)
                if r.status_code == 200:
                    out.ok += 1
                else:
                    out.failed_not_streaming += 1
                    out.error(f"{r.status_code}:{_error_code(r)}")
                return
            await _stream(client, url, body, out)
    except TimeoutError:
        out.hung_requests += 1
    except httpx.HTTPError as err:
        key = "failed_not_streaming" if not body["stream"] else "midstream_failures_without_error_event"
        setattr(out, key, getattr(out, key) + 1)
        out.error(type(err).__name__)


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], out: Outcomes) -> None:
    started = error = done = False
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            out.failed_streaming_unstarted += 1
            out.error(f"stream {r.status_code}")
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
            elif '"error"' in data[:10]:
                error = True
                out.error(f"event:{json.loads(data)['error'].get('code')}")
            else:
                started = True
    if done and not error:
        out.ok += 1
    elif done and error:
        if started:
            out.midstream_with_error_event += 1
        else:
            out.failed_streaming_unstarted += 1
    else:
        out.midstream_failures_without_error_event += 1


async def steady_load(base_url: str, model: str, out: Outcomes, stop: asyncio.Event, *, non_streaming: int = 4,
                      streaming: int = 2, max_tokens: int = 48, deadline_s: float = 120.0) -> None:
    """Client loops (one request at a time each) until ``stop`` is set; in-flight requests finish."""
    url = f"{base_url}/chat/completions"
    async with httpx.AsyncClient(timeout=httpx.Timeout(deadline_s + 10)) as client:
        async def loop(k: int, stream: bool) -> None:
            i = 0
            while not stop.is_set():
                await _one(client, url, _body(model, k * 100000 + i, stream, max_tokens), out, deadline_s)
                i += 1

        await asyncio.gather(*[loop(k, False) for k in range(non_streaming)],
                             *[loop(non_streaming + k, True) for k in range(streaming)])


async def burst(base_url: str, model: str, n: int, *, max_tokens: int = 16, timeout_s: float = 300.0) -> list[dict]:
    """``n`` non-streaming requests at once; each: status, seconds to its answer, Retry-After."""
    url = f"{base_url}/chat/completions"
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        async def one(i: int) -> dict:
            t0 = time.perf_counter()
            try:
                r = await client.post(url, json=_body(model, i, False, max_tokens))
                return {"status": r.status_code, "s": time.perf_counter() - t0,
                        "retry_after": r.headers.get("retry-after"),
                        "code": _error_code(r) if r.status_code != 200 else None}
            except httpx.HTTPError as err:
                return {"status": None, "s": time.perf_counter() - t0, "error": type(err).__name__}

        return await asyncio.gather(*[one(i) for i in range(n)])


async def burst_sequential(base_url: str, model: str, n: int, *, max_tokens: int = 16) -> list[dict]:
    """``n`` non-streaming requests one after another (as ``burst`` records them), over one connection."""
    url = f"{base_url}/chat/completions"
    rows = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        for i in range(n):
            t0 = time.perf_counter()
            r = await client.post(url, json=_body(model, 10**6 + i, False, max_tokens))
            rows.append({"status": r.status_code, "s": time.perf_counter() - t0,
                         "code": _error_code(r) if r.status_code != 200 else None})
    return rows
