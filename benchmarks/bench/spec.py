"""The contract between workloads and the load generator.

Owns ``BenchRequest`` (one HTTP request to send), ``Session`` (a chain of requests where each turn
may depend on the previous answer) and the ``Workload`` protocol. Single-shot workloads hand out
one-turn sessions (``SingleShot``), so the load generator has one scheduling path for everything.

Invariants: a workload is deterministic given its seed (the answers fed back into multi-turn sessions
are the only input from the server); prompts are built lazily, one session at a time, so a trace of
thousands of 10K-token prompts never sits in memory at once.

``Shard`` splits the session stream between load-generator processes: session ``i`` of the stream
(a whole session, every turn of it; a trace line for single-shot traces) belongs to shard ``i % count``.
``workload.sessions(shard)`` yields exactly the sessions of the unsharded stream that the shard owns,
unchanged (same prompts, same ``arrival_s``), and builds no prompt it does not own; the shards of one
count are disjoint and together give the whole stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

Api = Literal["completions", "chat"]


@dataclass(slots=True)
class BenchRequest:
    """One request to send.

    Attributes:
        api: ``completions`` (``prompt`` is a list of token ids) or ``chat`` (``messages``).
        max_tokens: output tokens asked for (exact with ``ignore_eos``).
        prompt: token ids for ``/v1/completions``.
        messages: chat messages for ``/v1/chat/completions``.
        input_tokens: exact prompt length when known (token-id prompts), else None.
        session_id: sent as the ``x-session-id`` header when set.
        arrival_s: offset from the start of the run at which to send it (trace replay), else None.
        tag: short label of the request's sharing group (document id, session id); never prompt text.
    """

    api: Api
    max_tokens: int
    prompt: list[int] | None = None
    messages: list[dict] | None = None
    input_tokens: int | None = None
    session_id: str | None = None
    arrival_s: float | None = None
    tag: str = ""


@dataclass(frozen=True, slots=True)
class Shard:
    """Part ``index`` of ``count`` of a session stream (see module doc); ``WHOLE`` is the stream itself."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index must be in [0, {self.count}), got {self.index}")

    def owns(self, position: int) -> bool:
        """True when the session at ``position`` (0-based) of the whole stream belongs to this shard."""
        return position % self.count == self.index


WHOLE = Shard()


class Session(Protocol):
    """A chain of turns; the next turn is produced once the previous answer is known."""

    session_id: str
    arrival_s: float | None

    def next_request(self, last_answer: str | None) -> BenchRequest | None:
        """Return the next turn (``last_answer`` is None before the first turn), or None when done."""


class Workload(Protocol):
    """A deterministic source of sessions."""

    name: str
    #: True when sessions carry ``arrival_s`` (trace replay is the natural load mode).
    timed: bool
    #: True when a turn needs the previous answer's text (the client must keep the text).
    needs_answers: bool

    def params(self) -> dict:
        """Parameters that define the workload, for the result JSON."""

    def sessions(self, shard: Shard = WHOLE) -> Iterator[Session]:
        """The sessions in send order (may be endless; the load generator bounds the run), only the
        ones ``shard`` owns."""

    def warmup(self, n: int) -> list[BenchRequest]:
        """``n`` requests shaped like the workload that share no prefix with it."""


class SingleShot:
    """A one-turn session wrapping a fixed request."""

    __slots__ = ("_request", "arrival_s", "session_id")

    def __init__(self, request: BenchRequest, session_id: str = "") -> None:
        self.session_id = session_id or request.session_id or ""
        self.arrival_s = request.arrival_s
        self._request: BenchRequest | None = request

    def next_request(self, last_answer: str | None) -> BenchRequest | None:
        request, self._request = self._request, None
        return request
