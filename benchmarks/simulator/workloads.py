"""Simulated workloads: requests as (arrival time, prompt block hashes, prompt/output lengths).

Owns: ``SimRequest`` and the open-loop generators ``shared_prefix``, ``no_sharing``, ``multi_turn``
and ``mooncake`` (fixed arrival times), plus the session sources that mirror ``kvserve bench``'s
workloads for closed-loop and trace runs (``docqa_sessions``, ``multiturn_sessions``,
``mooncake_sessions``, ``trace_sessions``; see ``load.py``). Requests carry block hashes directly
(chained, so two prompts share a hash exactly when they share the whole prefix up to that block); the
routers see nothing else, so no tokens are generated or hashed. The Mooncake trace
(../shared/traces/mooncake, 512-token hash-id blocks) is replayed with block_size = 512: each trace hash
id is one block, chained in order.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import count
from pathlib import Path

from benchmarks.simulator.load import SimSession, Turn

_MASK = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SimRequest:
    rid: int
    arrival: float
    prompt_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...]
    session: str | None = None


def chain(ids: list[int], salt: int = 0) -> tuple[int, ...]:
    """Chained 64-bit block keys over content ids (deterministic, not vLLM's: the sim needs none)."""
    out, parent = [], salt
    for i in ids:
        parent = hash((parent, i)) & _MASK
        out.append(parent)
    return tuple(out)


def _arrivals(n: int, rate: float, rng: random.Random, poisson: bool) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate) if poisson else 1.0 / rate
        out.append(t)
    return out


def shared_prefix(
    n: int, rate: float, *, docs: int = 4, doc_tokens: int = 4096, question_tokens: int = 128,
    output_tokens: int = 64, block_size: int = 16, seed: int = 0, poisson: bool = True,
) -> list[SimRequest]:
    """Document QA: ``docs`` long shared documents, each request = one document + a unique question."""
    rng = random.Random(seed)
    out = []
    for i, t in enumerate(_arrivals(n, rate, rng, poisson)):
        d = rng.randrange(docs)
        prompt = doc_tokens + question_tokens
        ids = [d * 1_000_003 + b for b in range(doc_tokens // block_size)]
        ids += [-(i * 1_000_003 + b + 1) for b in range(question_tokens // block_size)]
        out.append(SimRequest(i, t, prompt, output_tokens, chain(ids)))
    return out


def no_sharing(
    n: int, rate: float, *, prompt_tokens: int = 1024, output_tokens: int = 64, block_size: int = 16,
    seed: int = 0, poisson: bool = True,
) -> list[SimRequest]:
    """Random prompts: nothing is shared, so cache-aware routing can only balance load."""
    rng = random.Random(seed)
    return [
        SimRequest(i, t, prompt_tokens, output_tokens,
                   chain([rng.getrandbits(62) for _ in range(prompt_tokens // block_size)]))
        for i, t in enumerate(_arrivals(n, rate, rng, poisson))
    ]


def multi_turn(
    n: int, rate: float, *, sessions: int = 32, turns: int = 8, system_tokens: int = 512, turn_tokens: int = 256,
    output_tokens: int = 128, block_size: int = 16, seed: int = 0, poisson: bool = True,
) -> list[SimRequest]:
    """Chat sessions whose history grows: turn k's prompt = system + k previous turns + new text.

    ``sessions`` are open at once; a session ends after ``turns`` turns and a new one takes its slot.
    """
    rng = random.Random(seed)
    history: dict[int, list[int]] = {}
    count: dict[int, int] = {}
    names: dict[int, str] = {}
    out = []
    per_turn = (turn_tokens + output_tokens) // block_size
    for i, t in enumerate(_arrivals(n, rate, rng, poisson)):
        s = rng.randrange(sessions)
        if count.get(s, 0) >= turns or s not in history:
            history[s], count[s], names[s] = list(range(system_tokens // block_size)), 0, f"s{i}"
        ids = history[s]
        ids += [rng.getrandbits(62) for _ in range(per_turn)]
        count[s] += 1
        out.append(SimRequest(i, t, len(ids) * block_size, output_tokens, chain(list(ids)), session=names[s]))
    return out


def mooncake(
    path: str | Path, *, limit: int | None = None, time_scale: float = 1.0, block_size: int = 512,
    max_prompt_tokens: int | None = None,
) -> list[SimRequest]:
    """Replay the Mooncake conversation trace (timestamps in ms; ``time_scale`` < 1 compresses time)."""
    out = []
    with Path(path).open() as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            rec = json.loads(line)
            prompt = int(rec["input_length"])
            ids = list(rec["hash_ids"])
            if max_prompt_tokens is not None and prompt > max_prompt_tokens:
                prompt, ids = max_prompt_tokens, ids[: max_prompt_tokens // block_size + 1]
            full = prompt // block_size  # the trailing partial block is never cached
            out.append(SimRequest(i, rec["timestamp"] / 1000.0 * time_scale, prompt, int(rec["output_length"]),
                                  chain(ids[:full])))
    return out


#: Tokens per filler word of ``benchmarks.bench.tokens.words`` (SmolLM2's tokenizer: 1.0 on 20 x 512 words)
#: and the chat template's tokens per message; the multiturn workload sends chat messages of words.
TOKENS_PER_WORD = 1.0
CHAT_MESSAGE_TOKENS = 5


def trace_sessions(requests: list[SimRequest]) -> list[SimSession]:
    """Fixed-arrival requests as one-turn sessions (trace mode)."""
    return [SimSession(f"r{r.rid}", [Turn(r.prompt_tokens, r.output_tokens, r.block_hashes)], arrival_s=r.arrival,
                       sticky=r.session is not None) for r in requests]


def docqa_sessions(
    *, docs: int = 24, doc_tokens: tuple[int, int] = (4096, 8192), question_tokens: tuple[int, int] = (32, 64),
    output_len: int = 64, block_size: int = 16, seed: int | str = 0, salt: int = 0, no_sharing: bool = False,
) -> Iterator[SimSession]:
    """``kvserve bench --workload docqa``: endless one-turn sessions over ``docs`` shared documents
    (``no_sharing``: the bench's control, each question with a fresh document of the picked one's length)."""
    lens = random.Random(f"{seed}/docqa/lengths")
    doc_lens = [lens.randint(*doc_tokens) for _ in range(docs)]
    rng = random.Random(f"{seed}/docqa/picks")
    for i in count():
        d = rng.randrange(docs)
        q = rng.randint(*question_tokens)
        prompt = doc_lens[d] + q
        shared = doc_lens[d] // block_size
        doc = (5, i) if no_sharing else (1, d)  # tag 5: a fresh document per question (tags keep keys apart)
        ids = [(salt, *doc, b) for b in range(shared)] + [(salt, 2, i, b) for b in range(prompt // block_size - shared)]
        yield SimSession(f"q{i}", [Turn(prompt, output_len, chain_keys(ids))])


def multiturn_sessions(
    *, sessions: int = 128, turns: int = 8, system_words: int = 512, user_words: tuple[int, int] = (32, 96),
    output_len: int = 128, block_size: int = 16, seed: int | str = 0, salt: int = 0, sticky: bool = False,
) -> Iterator[SimSession]:
    """``kvserve bench --workload multiturn``: turn k's prompt is the whole history, so it extends turn k-1's.
    Its turns are chat messages (``Turn.text``: the ingress tokenises them).

    The conversation is one token stream per session (system, user 1, answer 1, ...); block i of the
    stream is the same in every turn that holds it whole, so its key is (session, i). A turn's answer is in
    the stream too: the blocks its decode fills (``Turn.output_hashes``) are the next turn's to reuse.
    """
    index = 0
    while sessions == 0 or index < sessions:
        rng = random.Random(f"{seed}/multiturn/session/{index}")
        length = int(system_words * TOKENS_PER_WORD) + 7 + CHAT_MESSAGE_TOKENS
        out = []
        for _ in range(turns):
            length += int(rng.randint(*user_words) * TOKENS_PER_WORD) + CHAT_MESSAGE_TOKENS
            full = (length + output_len - 1) // block_size  # the last output token's KV is never computed
            keys = chain_keys([(salt, 3, index, b) for b in range(max(full, length // block_size))])
            prompt = length // block_size
            out.append(Turn(length, output_len, keys[:prompt], text=True, output_hashes=keys[prompt:full]))
            length += output_len + CHAT_MESSAGE_TOKENS
        yield SimSession(f"s{salt}-{index}", out, sticky=sticky)
        index += 1


def mooncake_sessions(
    path: str | Path, *, block_tokens: int = 64, max_input_tokens: int | None = 7000,
    max_output_tokens: int | None = 256,
    time_scale: float = 1.0, copies: int = 1, limit: int | None = None, block_size: int = 16, seed: int | str = 0,
) -> list[SimSession]:
    """``kvserve bench --workload mooncake`` (hash id -> ``block_tokens`` tokens, lengths x block_tokens/512;
    ``time_scale`` 10 replays ten times faster, as the bench's flag does).

    ``copies`` > 1 replays the trace that many times at once, each copy a separate user population
    (its own hash namespace) starting at a random offset within the trace's first minute: the way the scale
    table grows the offered load with the cluster while keeping the trace's reuse structure.
    """
    if block_tokens % block_size:
        raise ValueError(f"block_tokens ({block_tokens}) must be a multiple of the block size ({block_size})")
    per = block_tokens // block_size
    records = _trace_records(str(path), limit)
    t0 = records[0]["timestamp"] if records else 0
    rng = random.Random(f"{seed}/mooncake/copies")
    out = []
    for c in range(copies):
        offset = rng.uniform(0.0, 60.0) / time_scale if c else 0.0
        for i, rec in enumerate(records):
            n = max(1, math.ceil(rec["input_length"] * block_tokens / 512))
            n = min(n, max_input_tokens) if max_input_tokens else n
            m = int(rec["output_length"])
            m = min(m, max_output_tokens) if max_output_tokens else m
            ids = [(c, 4, h, j) for h in rec["hash_ids"] for j in range(per)][: n // block_size]
            arrival = (rec["timestamp"] - t0) / 1000.0 / time_scale + offset
            out.append(SimSession(f"m{c}-{i}", [Turn(n, max(1, m), chain_keys(ids))], arrival_s=arrival))
    out.sort(key=lambda s: s.arrival_s)
    return out


@lru_cache(maxsize=4)
def _trace_records(path: str, limit: int | None) -> tuple[dict, ...]:
    """The trace's records, read once per (path, limit) (calibration simulates its cells many times)."""
    records = []
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
            if limit is not None and len(records) >= limit:
                break
    return tuple(records)


def chain_keys(keys: list) -> tuple[int, ...]:
    """Chained 64-bit block keys over tuples of ints (deterministic: no str hashing) (same keys in the same
    order, same chain)."""
    out, parent = [], 0
    for k in keys:
        parent = hash((parent, k)) & _MASK
        out.append(parent)
    return tuple(out)
