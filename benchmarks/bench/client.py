"""One streaming OpenAI request, timed: ``StreamClient.send(BenchRequest) -> RequestRecord``.

Owns the HTTP side of the benchmark: ``ClientSettings`` (picklable: what every load-generator
process needs to open its own connection pool and ``StreamClient``), the request body
(``/v1/completions`` with token-id prompts or ``/v1/chat/completions``;
``stream_options.include_usage``; ``ignore_eos``), SSE parsing and the per-request measurements:

    ttft_s         send -> first chunk with non-empty text (``text`` / ``delta.content``)
    first_chunk_s  send -> first chunk carrying ``choices`` (what ``vllm bench serve`` calls TTFT)
    itl_s          gaps between consecutive content chunks after the first
    e2e_s          send -> ``data: [DONE]``
    usage          prompt/completion tokens and ``prompt_tokens_details.cached_tokens`` if reported
    replica        the replica that served it, from kvserve's ``x-kvserve-replica`` response header
                   (``ingress.expose_replica_header``; None without it)

With ``server_timing`` (``kvserve bench --server-timing``, against an ingress with ``ingress.server_timing_header``)
each request also records where its time to the first chunk went, from its ``Server-Timing`` header
(``parse_server_timing``) and httpx's trace of the request:

    sent_s         send -> the request's headers start going out (the client's loop and connection pool)
    accepted_s     send -> the ingress accepted it (the header's ``accepted``, an epoch time: both ends' wall
                   clocks, exact on one machine)
    server_ms      the ingress's stages up to its first chunk (``tokenize`` .. ``return`` and their sum ``ingress``)

Every failure becomes a record with ``error`` set (``http_<status>``, ``connect``, ``timeout``,
``read``, ``stream_error``, ``bad_chunk``, ``incomplete``); nothing is raised or dropped. Prompts are
never logged or kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from array import array
from dataclasses import dataclass, field

import httpx

from benchmarks.bench.spec import BenchRequest

logger = logging.getLogger(__name__)

_DETAIL_CHARS = 200


@dataclass(slots=True)
class RequestRecord:
    """What one request measured. Times are seconds; ``start_s`` is relative to the run's start."""

    start_s: float
    max_tokens: int
    input_tokens: int | None = None
    session_id: str | None = None
    tag: str = ""
    ok: bool = False
    error: str | None = None
    status: int | None = None
    detail: str | None = None
    ttft_s: float | None = None
    first_chunk_s: float | None = None
    e2e_s: float | None = None
    itl_s: array = field(default_factory=lambda: array("d"))
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    usage_reported: bool = False
    content_chunks: int = 0
    text: str | None = None
    sent_s: float | None = None
    accepted_s: float | None = None
    server_ms: dict | None = None
    replica: str | None = None


#: kvserve's response header naming the replica that served a request (``ingress.expose_replica_header``).
REPLICA_HEADER = "x-kvserve-replica"


def parse_server_timing(value: str) -> tuple[float | None, dict[str, float]]:
    """A ``Server-Timing`` header -> (its ``accepted`` metric's ``desc`` as a number, or None; name -> ``dur``)."""
    accepted, durations = None, {}
    for metric in value.split(","):
        name, *params = (p.strip() for p in metric.split(";"))
        fields = dict(p.partition("=")[::2] for p in params)
        try:
            if name == "accepted" and "desc" in fields:
                accepted = float(fields["desc"].strip('"'))
            elif name and "dur" in fields:
                durations[name] = float(fields["dur"])
        except ValueError:
            continue
    return accepted, durations


def _error_detail(body: bytes) -> str:
    try:
        data = json.loads(body)
        message = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(message, dict):
            message = message.get("message", message)
        text = str(message)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace")
    return text[:_DETAIL_CHARS]


@dataclass(frozen=True)
class ClientSettings:
    """Target and request options of a run; ``open`` and ``client`` build the HTTP side from them."""

    base_url: str
    model: str
    headers: dict = field(default_factory=dict)
    extra_body: dict = field(default_factory=dict)
    ignore_eos: bool = True
    temperature: float = 0.0
    request_timeout_s: float = 600.0
    server_timing: bool = False

    def open(self, max_connections: int | None) -> httpx.AsyncClient:
        """A connection pool of ``max_connections`` (None: unbounded) with these headers."""
        # trust_env=False: no proxy from the environment sits between the load generator and the server
        return httpx.AsyncClient(timeout=httpx.Timeout(self.request_timeout_s, connect=10.0),
                                 limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=None),
                                 headers=self.headers, trust_env=False)

    def client(self, http: httpx.AsyncClient) -> StreamClient:
        return StreamClient(http, self.base_url, self.model, ignore_eos=self.ignore_eos,
                            temperature=self.temperature, extra_body=self.extra_body,
                            request_timeout_s=self.request_timeout_s, server_timing=self.server_timing)


class StreamClient:
    """Sends ``BenchRequest``s to one OpenAI base URL and model over a shared ``httpx.AsyncClient``."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, model: str, *, ignore_eos: bool = True,
                 temperature: float = 0.0, extra_body: dict | None = None, request_timeout_s: float = 600.0,
                 clock=time.perf_counter, server_timing: bool = False) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._model = model
        self._ignore_eos = ignore_eos
        self._temperature = temperature
        self._extra = dict(extra_body or {})
        self._timeout = request_timeout_s
        self._clock = clock
        self._server_timing = server_timing

    def body(self, request: BenchRequest) -> tuple[str, dict]:
        """Return (url, JSON body) for ``request``."""
        body: dict = {"model": self._model, "max_tokens": request.max_tokens, "temperature": self._temperature,
                      "stream": True, "stream_options": {"include_usage": True}}
        if self._ignore_eos:
            body["ignore_eos"] = True
        if request.api == "completions":
            body["prompt"] = request.prompt
            url = f"{self._base}/completions"
        else:
            body["messages"] = request.messages
            url = f"{self._base}/chat/completions"
        body.update(self._extra)
        return url, body

    async def send(self, request: BenchRequest, run_start: float, keep_text: bool = False) -> RequestRecord:
        """Send ``request`` and return its record; never raises for server or network failures."""
        url, body = self.body(request)
        headers = {"x-session-id": request.session_id} if request.session_id else None
        t0 = self._clock()
        record = RequestRecord(start_s=t0 - run_start, max_tokens=request.max_tokens,
                               input_tokens=request.input_tokens, session_id=request.session_id, tag=request.tag)
        pieces: list[str] | None = [] if keep_text else None
        extensions = None
        if self._server_timing:
            t0_wall = time.time()

            async def trace(event: str, _info: dict) -> None:
                if event.endswith("send_request_headers.started") and record.sent_s is None:
                    record.sent_s = self._clock() - t0

            extensions = {"trace": trace}
        try:
            async with asyncio.timeout(self._timeout):
                async with self._http.stream("POST", url, json=body, headers=headers,
                                             extensions=extensions) as response:
                    record.status = response.status_code
                    record.replica = response.headers.get(REPLICA_HEADER)
                    if self._server_timing and "server-timing" in response.headers:
                        accepted, record.server_ms = parse_server_timing(response.headers["server-timing"])
                        record.accepted_s = accepted - t0_wall if accepted is not None else None
                    if response.status_code != 200:
                        record.error = f"http_{response.status_code}"
                        record.detail = _error_detail(await response.aread())
                        return record
                    await self._consume(response, record, t0, pieces)
        except TimeoutError:
            record.error, record.detail = "timeout", f"no complete answer within {self._timeout:g}s"
        except httpx.TimeoutException as exc:
            record.error, record.detail = "timeout", f"{type(exc).__name__}: {exc}"[:_DETAIL_CHARS]
        except httpx.ConnectError as exc:
            record.error, record.detail = "connect", str(exc)[:_DETAIL_CHARS]
        except httpx.HTTPError as exc:
            record.error, record.detail = "read", f"{type(exc).__name__}: {exc}"[:_DETAIL_CHARS]
        if pieces is not None and record.ok:
            record.text = "".join(pieces)
        return record

    async def _consume(self, response: httpx.Response, record: RequestRecord, t0: float,
                       pieces: list[str] | None) -> None:
        clock = self._clock
        last_content: float | None = None
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                record.e2e_s = clock() - t0
                record.ok = record.error is None
                break
            now = clock()
            try:
                chunk = json.loads(payload)
            except ValueError:
                record.error, record.detail = "bad_chunk", payload[:_DETAIL_CHARS]
                return
            if "error" in chunk or chunk.get("object") == "error":
                record.error, record.detail = "stream_error", _error_detail(payload.encode())
                return
            choices = chunk.get("choices")
            if choices:
                if record.first_chunk_s is None:
                    record.first_chunk_s = now - t0
                choice = choices[0]
                text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                if text:
                    record.content_chunks += 1
                    if last_content is None:
                        record.ttft_s = now - t0
                    else:
                        record.itl_s.append(now - last_content)
                    last_content = now
                    if pieces is not None:
                        pieces.append(text)
            usage = chunk.get("usage")
            if usage:
                record.usage_reported = True
                record.prompt_tokens = usage.get("prompt_tokens")
                record.output_tokens = usage.get("completion_tokens")
                details = usage.get("prompt_tokens_details") or {}
                if details.get("cached_tokens") is not None:
                    record.cached_tokens = details["cached_tokens"]
        if record.e2e_s is None:
            record.error, record.detail = "incomplete", "stream ended without data: [DONE]"
            return
        if record.ttft_s is None:  # only empty-text chunks: fall back to the first chunk
            record.ttft_s = record.first_chunk_s
        if not record.usage_reported:
            record.output_tokens = record.content_chunks
