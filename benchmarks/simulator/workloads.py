"""Simulated workloads: requests as (arrival time, prompt block hashes, prompt/output lengths).

Owns: ``SimRequest`` and the generators ``shared_prefix``, ``no_sharing``, ``multi_turn`` and
``mooncake``. Requests carry block hashes directly (chained, so two prompts share a hash exactly
when they share the whole prefix up to that block); the routers see nothing else, so no tokens are
generated or hashed. The Mooncake trace (../shared/traces/mooncake, 512-token hash-id blocks) is
replayed with block_size = 512: each trace hash id is one block, chained in order.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

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
        SimRequest(i, t, prompt_tokens, output_tokens, chain([rng.getrandbits(62) for _ in range(prompt_tokens // block_size)]))
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
