"""The ``multiturn`` workload: interleaved chat sessions whose history grows turn by turn.

Owns ``MultiTurnWorkload`` and ``ChatSession``. A session is a system prompt plus ``turns`` user
messages; turn k sends the whole history so far (system, user 1, assistant answer 1, ..., user k) to
``/v1/chat/completions`` with the ``x-session-id`` header, so each turn's prompt extends the previous
turn's prompt and its answer. The answers are the server's real answers (the only non-seeded input).
The load generator interleaves sessions: a session's next turn becomes ready when its previous turn
finishes and then waits its turn behind the other ready sessions.

``no_sharing=True`` is the control: every turn starts with a unique nonce line, so no two requests
share a prefix while prompt lengths stay the same.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from benchmarks.bench.spec import WHOLE, BenchRequest, Shard
from benchmarks.bench.tokens import words


class ChatSession:
    """One conversation; ``next_request`` appends the previous answer and the next user message."""

    __slots__ = ("_history", "_max_tokens", "_nonce", "_system", "_turn", "_users", "arrival_s", "session_id")

    def __init__(self, session_id: str, system: str, users: list[str], max_tokens: int, nonce: str | None) -> None:
        self.session_id = session_id
        self.arrival_s: float | None = None
        self._system = system
        self._users = users
        self._max_tokens = max_tokens
        self._history: list[dict] = []
        self._turn = 0
        self._nonce = nonce

    def next_request(self, last_answer: str | None) -> BenchRequest | None:
        if self._turn > 0:
            self._history.append({"role": "assistant", "content": last_answer or ""})
        if self._turn >= len(self._users):
            return None
        self._history.append({"role": "user", "content": self._users[self._turn]})
        system = self._system
        if self._nonce is not None:
            system = f"[{self._nonce}/{self._turn}]\n{system}"
        self._turn += 1
        messages = [{"role": "system", "content": system}, *self._history]
        return BenchRequest(api="chat", max_tokens=self._max_tokens, messages=messages,
                            session_id=self.session_id, tag=self.session_id)


@dataclass
class MultiTurnWorkload:
    """``num_sessions`` sessions of ``turns`` turns each (endless when ``num_sessions`` is 0)."""

    num_sessions: int = 64
    turns: int = 8
    system_words: int = 512
    user_words: tuple[int, int] = (32, 96)
    output_len: int = 128
    seed: int | str = 0
    no_sharing: bool = False
    shared_system: bool = False
    name: str = "multiturn"
    timed: bool = False
    needs_answers: bool = True

    def __post_init__(self) -> None:
        lo, hi = self.user_words
        if not 1 <= lo <= hi:
            raise ValueError(f"multiturn: user_words must be LO:HI with 1 <= LO <= HI, got {lo}:{hi}")
        if self.turns < 1 or self.output_len < 1 or self.num_sessions < 0 or self.system_words < 0:
            raise ValueError("multiturn: turns and output_len must be >= 1, sessions and system_words >= 0")

    def params(self) -> dict:
        return {"num_sessions": self.num_sessions, "turns": self.turns, "system_words": self.system_words,
                "user_words": list(self.user_words), "output_len": self.output_len,
                "no_sharing": self.no_sharing, "shared_system": self.shared_system}

    def session(self, index: int, prefix: str = "session") -> ChatSession:
        key = f"{prefix}/{index}"
        rng = random.Random(f"{self.seed}/multiturn/{key}")
        system_key = "multiturn/system" if self.shared_system else f"multiturn/{key}/system"
        system = "You are a helpful assistant.\n" + words(self.seed, system_key, self.system_words)
        users = [words(self.seed, f"multiturn/{key}/user/{t}", rng.randint(*self.user_words))
                 for t in range(self.turns)]
        nonce = f"{self.seed}:{key}" if self.no_sharing else None
        return ChatSession(f"{self.seed}-{prefix}-{index}", system, users, self.output_len, nonce)

    def sessions(self, shard: Shard = WHOLE) -> Iterator[ChatSession]:
        index = shard.index
        while self.num_sessions == 0 or index < self.num_sessions:
            yield self.session(index)
            index += shard.count

    def warmup(self, n: int) -> list[BenchRequest]:
        out = []
        for i in range(n):
            request = self.session(i, prefix="warmup").next_request(None)
            assert request is not None, "a session has at least one turn"
            out.append(request)
        return out
