"""Where a request's time to first byte goes: per-stage stamps, histograms and OpenTelemetry spans.

Owns: ``STAGES`` (the stage names, in request order), ``AcceptedAtMiddleware`` (an ASGI middleware that
stamps when the HTTP request arrived), ``RequestStages`` (one request's stamps; it records one histogram
per stage when the first byte goes out) and ``Tracer`` (request spans over OTLP when
``tracing.otlp_traces_endpoint`` is set; otherwise nothing is imported or exported). ``RequestStages.server_timing``
is the ``Server-Timing`` response header of ``ingress.server_timing_header``.

The stages, each from the end of the previous one:

    tokenize    HTTP request accepted -> body validated, prompt rendered and tokenized   (ingress)
    hash        -> the prompt's KV block hashes computed                                  (ingress)
    dispatch    handed to the deployment handle -> the replica started it: routing
                decision, queueing in the handle, transfer                                (ingress -> replica)
    engine      replica received -> the engine's first output (queue + prefill)          (replica)
    return      first output -> its chunk reached the ingress                             (replica -> ingress)
    first_byte  chunk at the ingress -> first byte of the response handed to the server  (ingress)

The replica also splits its ``engine`` stage by vLLM's own stamps of the request (``RequestOutput.metrics``, a
``RequestStateStats``; ``engine_parts_ms``), one histogram per part (``ENGINE_PARTS``), in finer buckets than vLLM's
own request histograms (whose first bucket is 0.3 s)::

    vllm_queue     the engine core queued it -> scheduled it                      (engine core clock)
    vllm_prefill   scheduled -> the core had the step that made its first token   (engine core clock; with
                   asynchronous scheduling the step already formed when it was scheduled is in here)
    vllm_frontend  vLLM's TTFT (its front end's arrival -> first output processed) less the two above: input
                   processing, the hop to the core and the wait for its loop to take the request in, the hop
                   back and output processing
    replica        the engine stage less vLLM's TTFT: kvserve's replica before the engine and after its output

Stamps inside one process use ``time.perf_counter``; the replica's stamps are wall-clock times carried
back in ``ReplicaTiming`` and placed against the ingress's own wall-clock dispatch time, so ``dispatch``
and ``return`` are as exact as the two nodes' clock sync (exact on one node). A negative difference
(clock skew) is recorded as 0.
"""

from __future__ import annotations

import time
from typing import Any

from deployments.metrics import metrics
from deployments.protocol import ReplicaTiming

STAGES = ("tokenize", "hash", "dispatch", "engine", "return", "first_byte")
ENGINE_PARTS = ("replica", "vllm_frontend", "vllm_queue", "vllm_prefill")
_STATE_KEY = "kvserve_accepted_at"


class AcceptedAtMiddleware:
    """Stamps ``scope["state"]["kvserve_accepted_at"]`` (perf_counter) when an HTTP request arrives."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})[_STATE_KEY] = time.perf_counter()
        await self.app(scope, receive, send)


def accepted_at(request: Any) -> float:
    """When the middleware saw ``request`` arrive (now, if it did not run)."""
    return getattr(request.state, _STATE_KEY, None) or time.perf_counter()


def engine_parts_ms(stats: Any, engine_s: float) -> dict[str, float]:
    """The replica's engine stage (``engine_s`` seconds, received -> first output) split by vLLM's request stats
    (``RequestOutput.metrics`` at the first output), in milliseconds; empty when the stats are absent or not
    stamped (``disable_log_stats``, or an engine that does not keep them). Each part is clamped at 0."""
    ttft = getattr(stats, "first_token_latency", 0.0) or 0.0
    queued, scheduled, first = (getattr(stats, k, 0.0) or 0.0 for k in ("queued_ts", "scheduled_ts", "first_token_ts"))
    if ttft <= 0 or not 0 < queued <= scheduled <= first:
        return {}
    queue, prefill = scheduled - queued, first - scheduled
    parts = {"replica": engine_s - ttft, "vllm_frontend": ttft - queue - prefill, "vllm_queue": queue,
             "vllm_prefill": prefill}
    return {k: max(v, 0.0) * 1000 for k, v in parts.items()}


def record_engine_parts(model: str, replica: str, stats: Any, engine_s: float) -> None:
    """Observe ``engine_parts_ms`` in the replica's histograms (nothing when vLLM kept no stats)."""
    parts = engine_parts_ms(stats, engine_s)
    if parts:
        hist, tags = metrics().engine_part_ms, {"model": model, "replica": replica}
        for part, ms in parts.items():
            hist[part].observe(ms, tags=tags)


class RequestStages:
    """One request's stamps; ``first_byte`` records the stage histograms (and spans) exactly once."""

    __slots__ = (
        "_done",
        "_model",
        "_span",
        "_tracer",
        "accepted",
        "dispatched",
        "dispatched_wall",
        "first_chunk",
        "first_chunk_wall",
        "hashed",
        "replica",
        "timing",
        "tokenized",
    )

    def __init__(self, model: str, accepted: float, tracer: Tracer | None = None) -> None:
        self._model, self._tracer = model, tracer
        self.accepted = accepted
        self.tokenized = self.hashed = self.dispatched = self.dispatched_wall = 0.0
        self.first_chunk = self.first_chunk_wall = 0.0
        self.timing: ReplicaTiming | None = None
        self.replica = ""
        self._done = False
        self._span = tracer.start(model, accepted) if tracer is not None else None

    def trace_headers(self) -> dict[str, str] | None:
        """W3C trace context of this request's span, for the engine (None without tracing)."""
        return self._tracer.headers(self._span) if self._span is not None else None

    def mark_dispatched(self) -> None:
        self.dispatched, self.dispatched_wall = time.perf_counter(), time.time()

    def on_chunk(self, timing: ReplicaTiming | None, replica: str | None) -> None:
        """A chunk arrived from the replica; the first one carries its timing."""
        if self.first_chunk == 0.0:
            self.first_chunk, self.first_chunk_wall = time.perf_counter(), time.time()
            self.timing, self.replica = timing, replica or ""

    def durations_ms(self, first_byte: float) -> dict[str, float]:
        """Stage -> milliseconds (only the stages whose both ends were stamped)."""
        out: dict[str, float] = {}
        if self.tokenized:
            out["tokenize"] = self.tokenized - self.accepted
        if self.hashed:
            out["hash"] = self.hashed - self.tokenized
        t = self.timing
        if t is not None and self.dispatched_wall:
            out["dispatch"] = t.received_at - self.dispatched_wall
            out["engine"] = t.first_output_at - t.received_at
            out["return"] = self.first_chunk_wall - t.first_output_at
        if self.first_chunk:
            out["first_byte"] = first_byte - self.first_chunk
        return {k: max(v, 0.0) * 1000 for k, v in out.items()}

    def server_timing(self) -> str:
        """A ``Server-Timing`` header value: ``accepted`` (``desc``: when the request was accepted, epoch seconds),
        each stage stamped up to the first chunk at the ingress and ``ingress`` (accepted -> that chunk), in ms."""
        accepted_wall = time.time() - (time.perf_counter() - self.accepted)
        parts = [f'accepted;desc="{accepted_wall:.6f}"']
        parts += [f"{stage};dur={ms:.3f}" for stage, ms in self.durations_ms(self.first_chunk).items()
                  if stage != "first_byte"]
        if self.first_chunk:
            parts.append(f"ingress;dur={(self.first_chunk - self.accepted) * 1000:.3f}")
        return ", ".join(parts)

    def first_byte(self) -> None:
        """The first byte of the response goes out now: record every stage once."""
        if self._done:
            return
        self._done = True
        now = time.perf_counter()
        durations = self.durations_ms(now)
        tags = {"model": self._model, "replica": self.replica}
        hist = metrics().stage_ms
        for stage, ms in durations.items():
            hist[stage].observe(ms, tags=tags)
        if self._span is not None:
            self._tracer.stages(self._span, self.accepted, durations, self.replica)

    def end(self, status: str) -> None:
        """The request is over (any outcome): close its span."""
        if self._span is not None:
            self._tracer.end(self._span, status)
            self._span = None


class Tracer:
    """Request spans over OTLP/gRPC: one ``kvserve.request`` span, a child per stage, context to vLLM."""

    def __init__(self, endpoint: str, service_name: str) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.propagate import inject
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import Status, StatusCode, set_span_in_context

        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
        self._provider = provider
        self._tracer = provider.get_tracer("kvserve")
        self._inject, self._ctx = inject, set_span_in_context
        self._status, self._code = Status, StatusCode
        # perf_counter stamps -> epoch nanoseconds (spans need absolute times)
        self._offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)

    def _ns(self, perf: float) -> int:
        return self._offset_ns + int(perf * 1e9)

    def start(self, model: str, accepted: float) -> Any:
        return self._tracer.start_span("kvserve.request", start_time=self._ns(accepted),
                                       attributes={"gen_ai.request.model": model})

    def headers(self, span: Any) -> dict[str, str]:
        carrier: dict[str, str] = {}
        self._inject(carrier, context=self._ctx(span))
        return carrier

    def stages(self, span: Any, accepted: float, durations_ms: dict[str, float], replica: str) -> None:
        span.set_attribute("kvserve.replica", replica)
        ctx, t = self._ctx(span), self._ns(accepted)
        for stage in STAGES:
            if stage in durations_ms:
                end = t + int(durations_ms[stage] * 1e6)
                self._tracer.start_span(f"kvserve.{stage}", context=ctx, start_time=t).end(end_time=end)
                t = end

    def end(self, span: Any, status: str) -> None:
        span.set_attribute("kvserve.status", status)
        if status != "success":
            span.set_status(self._status(self._code.ERROR, status))
        span.end()

    def shutdown(self) -> None:
        self._provider.shutdown()
