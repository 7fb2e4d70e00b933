"""The ``mooncake`` workload: replay of the Mooncake FAST'25 conversation trace, scaled to fit.

Owns ``MooncakeWorkload``. The trace (one JSON object a line: ``timestamp`` ms, ``input_length``,
``output_length``, ``hash_ids`` of 512-token prefix blocks) is read lazily and turned into token-id
prompts for ``/v1/completions``:

    hash_ids  [0,  1,  2 ]      each id -> a fixed block of ``block_tokens`` ids (same id, same tokens)
    tokens    |B0 |B1 |B2 |     concatenated, then cut to the scaled input length
    prompt    |B0 |B1 |B2-|     requests sharing leading hash ids share exactly those blocks

Scaling: ``block_tokens`` (default 512) shrinks blocks for small models; input lengths scale by
``input_scale`` (default ``block_tokens / 512``, which keeps the block structure aligned) and are
capped at ``max_input_tokens``; output lengths scale by ``output_scale`` and are capped at
``max_output_tokens``; timestamps are divided by ``time_scale`` (10 = ten times faster) and become
``arrival_s`` relative to the first replayed request. ``start``/``limit`` select a slice.
``no_sharing=True`` gives every block of every request a unique id (same lengths, nothing shared).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.bench.spec import WHOLE, BenchRequest, Shard, SingleShot
from benchmarks.bench.tokens import DEFAULT_VOCAB, token_ids
from serve_app import settings

TRACE_BLOCK_TOKENS = 512
#: Blocks kept for reuse while building prompts (the trace reuses its early hash ids heavily).
BLOCK_CACHE_SIZE = 2048


@dataclass
class MooncakeWorkload:
    """Timed single-shot requests from a Mooncake-format trace."""

    path: Path = field(default_factory=settings.mooncake_trace)
    block_tokens: int = TRACE_BLOCK_TOKENS
    input_scale: float | None = None
    max_input_tokens: int | None = None
    output_scale: float = 1.0
    max_output_tokens: int | None = None
    time_scale: float = 1.0
    start: int = 0
    limit: int | None = None
    seed: int | str = 0
    no_sharing: bool = False
    vocab: tuple[int, int] = DEFAULT_VOCAB
    name: str = "mooncake"
    timed: bool = True
    needs_answers: bool = False
    _blocks: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.path.is_file():
            raise ValueError(f"mooncake: trace file not found: {self.path}")
        if self.block_tokens < 1 or self.time_scale <= 0 or self.output_scale <= 0:
            raise ValueError("mooncake: block_tokens must be >= 1, time_scale and output_scale > 0")
        if self.input_scale is not None and self.input_scale <= 0:
            raise ValueError("mooncake: input_scale must be > 0")
        if self.start < 0 or (self.limit is not None and self.limit < 1):
            raise ValueError("mooncake: start must be >= 0 and limit >= 1")

    @property
    def effective_input_scale(self) -> float:
        return self.input_scale if self.input_scale is not None else self.block_tokens / TRACE_BLOCK_TOKENS

    def params(self) -> dict:
        return {"path": str(self.path), "block_tokens": self.block_tokens, "input_scale": self.effective_input_scale,
                "max_input_tokens": self.max_input_tokens, "output_scale": self.output_scale,
                "max_output_tokens": self.max_output_tokens, "time_scale": self.time_scale, "start": self.start,
                "limit": self.limit, "no_sharing": self.no_sharing, "vocab": list(self.vocab)}

    def records(self) -> Iterator[dict]:
        """The selected raw trace records, in file order."""
        with self.path.open() as f:
            taken = 0
            for index, line in enumerate(f):
                if not line.strip() or index < self.start:
                    continue
                if self.limit is not None and taken >= self.limit:
                    return
                taken += 1
                yield json.loads(line)

    def input_len(self, record: dict) -> int:
        n = max(1, math.ceil(record["input_length"] * self.effective_input_scale))
        return min(n, self.max_input_tokens) if self.max_input_tokens else n

    def output_len(self, record: dict) -> int:
        n = max(1, round(record["output_length"] * self.output_scale))
        return min(n, self.max_output_tokens) if self.max_output_tokens else n

    def prompt(self, record: dict, index: int) -> list[int]:
        """Concatenate the blocks of ``record``'s hash ids and cut to its scaled input length."""
        n = self.input_len(record)
        out: list[int] = []
        for j, hash_id in enumerate(record["hash_ids"]):
            if len(out) >= n:
                break
            if self.no_sharing:
                out += token_ids(self.seed, f"mooncake/solo/{index}/{j}", self.block_tokens, self.vocab)
            else:
                out += self._block(hash_id)
        if len(out) < n:  # longer than its blocks: pad with tokens unique to this request
            out += token_ids(self.seed, f"mooncake/tail/{index}", n - len(out), self.vocab)
        return out[:n]

    def _block(self, hash_id: int) -> list[int]:
        block = self._blocks.get(hash_id)
        if block is None:
            block = token_ids(self.seed, f"mooncake/block/{hash_id}", self.block_tokens, self.vocab)
            self._blocks[hash_id] = block
            if len(self._blocks) > BLOCK_CACHE_SIZE:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(hash_id)
        return block

    def sessions(self, shard: Shard = WHOLE) -> Iterator[SingleShot]:
        """One single-shot session per trace line; a shard owns every ``count``-th line (its time kept)."""
        t0: float | None = None
        for index, record in enumerate(self.records()):
            t_ms = float(record["timestamp"])
            t0 = t_ms if t0 is None else t0
            if not shard.owns(index):
                continue
            prompt = self.prompt(record, index)
            request = BenchRequest(api="completions", max_tokens=self.output_len(record), prompt=prompt,
                                   input_tokens=len(prompt), arrival_s=(t_ms - t0) / 1000.0 / self.time_scale,
                                   tag=f"h{record['hash_ids'][0]}" if record["hash_ids"] else "")
            yield SingleShot(request)

    def warmup(self, n: int) -> list[BenchRequest]:
        length = min(self.block_tokens * 4, self.max_input_tokens or self.block_tokens * 4)
        return [BenchRequest(api="completions", max_tokens=16, input_tokens=length,
                             prompt=token_ids(self.seed, f"warmup/{i}", length, self.vocab)) for i in range(n)]
