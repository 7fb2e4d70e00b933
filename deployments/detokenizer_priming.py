"""How much of a prompt vLLM's incremental detokenizer is primed with, in a replica's process.

Owns: ``BoundedDecodeStream`` (builds ``tokenizers``' ``DecodeStream`` from the last ``max_prompt_tokens`` of the ids
it is primed with) and ``bound_detokenizer_priming`` (installs it for the process, once per bound).

vLLM 0.26-0.27's ``FastIncrementalDetokenizer`` builds ``tokenizers.decoders.DecodeStream(ids=prompt_token_ids)``
on the replica's event loop for every request, and the stream decodes those ids whole on the request's first output
token, and again on every later token that leaves a character incomplete (a byte-level token holding part of a
UTF-8 sequence: emoji, CJK, or a model that emits such tokens in a row). A long prompt makes each of those steps
cost its length while every other stream of the replica waits. The primed ids exist only so that the stream can
subtract the prompt's text from its first delta and join a character or word split across the boundary; a tail of
them does the same. vLLM looks ``DecodeStream`` up on the ``tokenizers.decoders`` module when it builds a stream,
so that backend shims can replace it; this module is such a shim. A stream built without ids (vLLM's reset after
an invalid-prefix error) is built as asked.
"""

from __future__ import annotations

import logging
from typing import Any

import tokenizers.decoders

logger = logging.getLogger(__name__)


class BoundedDecodeStream:
    """Callable in place of ``tokenizers.decoders.DecodeStream``: primes with at most ``max_prompt_tokens`` ids."""

    def __init__(self, original: Any, max_prompt_tokens: int) -> None:
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        self.original = original
        self.max_prompt_tokens = max_prompt_tokens

    def __call__(self, ids: Any = None, skip_special_tokens: bool = False) -> Any:
        if ids is not None and len(ids) > self.max_prompt_tokens:
            ids = list(ids[-self.max_prompt_tokens:])
        return self.original(ids=ids, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"BoundedDecodeStream(max_prompt_tokens={self.max_prompt_tokens}, original={self.original!r})"


def bound_detokenizer_priming(max_prompt_tokens: int | None) -> None:
    """Make every ``DecodeStream`` this process builds from now on prime with at most ``max_prompt_tokens`` ids.

    ``None`` restores ``tokenizers``' own class (vLLM's whole-prompt priming). Calling it again with another bound
    replaces the previous one: the bound is per process, and a replica's process serves one model.
    """
    current = tokenizers.decoders.DecodeStream
    original = current.original if isinstance(current, BoundedDecodeStream) else current
    if max_prompt_tokens is None:
        tokenizers.decoders.DecodeStream = original
        return
    if isinstance(current, BoundedDecodeStream) and current.max_prompt_tokens == max_prompt_tokens:
        return
    tokenizers.decoders.DecodeStream = BoundedDecodeStream(original, max_prompt_tokens)
    logger.info("vLLM's detokenizer primes with at most the last %d prompt tokens", max_prompt_tokens)
