"""The ``docqa`` workload: a few long shared documents, many short questions about them.

Owns ``DocQAWorkload``. Each request is (document, question): the document is a long shared prefix
(``doc_tokens`` sampled per document, default 4K-8K tokens), the question a short unique suffix.
Requests pick a document uniformly at random (seeded), so with prefix caching every document is
prefilled once and every later question only prefills its own tokens.

``api="completions"`` sends ``document tokens + question tokens`` as a token-id prompt of exact
length; ``api="chat"`` sends the document as filler words in the system message and the question
as the user message (lengths then approximate; ``usage`` gives the exact counts).

``no_sharing=True`` is the control: every question gets its own fresh document of the same length
distribution, so nothing is shared.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count

from benchmarks.bench.spec import WHOLE, Api, BenchRequest, Shard, SingleShot
from benchmarks.bench.tokens import DEFAULT_VOCAB, token_ids, words


@dataclass
class DocQAWorkload:
    """Endless questions over ``num_docs`` shared documents."""

    num_docs: int = 4
    doc_tokens: tuple[int, int] = (4096, 8192)
    question_tokens: tuple[int, int] = (32, 64)
    output_len: int = 64
    seed: int | str = 0
    api: Api = "completions"
    no_sharing: bool = False
    vocab: tuple[int, int] = DEFAULT_VOCAB
    name: str = "docqa"
    timed: bool = False
    needs_answers: bool = False
    _doc_lens: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for label, (lo, hi) in (("doc_tokens", self.doc_tokens), ("question_tokens", self.question_tokens)):
            if not 1 <= lo <= hi:
                raise ValueError(f"docqa: {label} must be LO:HI with 1 <= LO <= HI, got {lo}:{hi}")
        if self.num_docs < 1 or self.output_len < 1:
            raise ValueError("docqa: num_docs and output_len must be >= 1")
        rng = random.Random(f"{self.seed}/docqa/lengths")
        self._doc_lens = [rng.randint(*self.doc_tokens) for _ in range(self.num_docs)]

    def params(self) -> dict:
        return {"num_docs": self.num_docs, "doc_tokens": list(self.doc_tokens), "doc_lens": self._doc_lens,
                "question_tokens": list(self.question_tokens), "output_len": self.output_len, "api": self.api,
                "no_sharing": self.no_sharing, "vocab": list(self.vocab)}

    def _request(self, doc_key: str, doc_len: int, q_key: str, q_len: int) -> BenchRequest:
        if self.api == "completions":
            prompt = token_ids(self.seed, doc_key, doc_len, self.vocab) + token_ids(self.seed, q_key, q_len, self.vocab)
            return BenchRequest(api="completions", max_tokens=self.output_len, prompt=prompt,
                                input_tokens=doc_len + q_len, tag=doc_key)
        messages = [
            {"role": "system",
             "content": "Answer questions about this document.\n\n" + words(self.seed, doc_key, doc_len)},
            {"role": "user", "content": words(self.seed, q_key, q_len) + "?"},
        ]
        return BenchRequest(api="chat", max_tokens=self.output_len, messages=messages, tag=doc_key)

    def sessions(self, shard: Shard = WHOLE) -> Iterator[SingleShot]:
        rng = random.Random(f"{self.seed}/docqa/picks")
        for i in count():
            doc = rng.randrange(self.num_docs)  # every shard draws every pick: same picks as the whole stream
            q_len = rng.randint(*self.question_tokens)
            if not shard.owns(i):
                continue
            doc_key = f"docqa/solo/{i}" if self.no_sharing else f"docqa/doc/{doc}"
            yield SingleShot(self._request(doc_key, self._doc_lens[doc], f"docqa/q/{i}", q_len))

    def warmup(self, n: int) -> list[BenchRequest]:
        return [self._request(f"warmup/doc/{i}", self.doc_tokens[0], f"warmup/q/{i}", self.question_tokens[0])
                for i in range(n)]
