"""The ``random`` workload: unique random token-id prompts of exactly N tokens, M output tokens.

Owns ``RandomWorkload``: the same workload as ``vllm bench serve --dataset-name random`` with
``--random-range-ratio 0`` (e.g. 1024 in / 128 out). Prompts go to ``/v1/completions`` as token-id
lists with ``ignore_eos`` so every request generates exactly ``max_tokens``. Request ``i`` uses key
``random/i``; warm-up requests use ``warmup/i`` so nothing they cache helps the measured run. This
is also the "no sharing" control of the routing comparison.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count

from benchmarks.bench.spec import WHOLE, BenchRequest, Shard, SingleShot
from benchmarks.bench.tokens import DEFAULT_VOCAB, token_ids


@dataclass
class RandomWorkload:
    """Endless unique prompts of ``input_len`` tokens, each asking for ``output_len`` tokens."""

    input_len: int = 1024
    output_len: int = 128
    seed: int | str = 0
    vocab: tuple[int, int] = DEFAULT_VOCAB
    name: str = "random"
    timed: bool = False
    needs_answers: bool = False

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"random: input and output lengths must be >= 1, got {self.input_len}/{self.output_len}")

    def params(self) -> dict:
        return {"input_len": self.input_len, "output_len": self.output_len, "vocab": list(self.vocab)}

    def request(self, key: str) -> BenchRequest:
        prompt = token_ids(self.seed, key, self.input_len, self.vocab)
        return BenchRequest(api="completions", max_tokens=self.output_len, prompt=prompt,
                            input_tokens=self.input_len, tag=key)

    def sessions(self, shard: Shard = WHOLE) -> Iterator[SingleShot]:
        for i in count(shard.index, shard.count):
            yield SingleShot(self.request(f"random/{i}"))

    def warmup(self, n: int) -> list[BenchRequest]:
        return [self.request(f"warmup/{i}") for i in range(n)]
