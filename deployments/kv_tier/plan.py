"""Scheduler-side arithmetic of the KV tier: which blocks to load, which to store, in what chunks.

Owns: ``ReqPlan`` (per-request bookkeeping), ``loadable_blocks``, ``hit_run`` and
``store_ranges``. Pure Python (no ray, torch or vllm imports); the vLLM adapter in
``connector.py`` feeds it plain ints.

Block arithmetic for one prompt of ``T`` tokens, block size ``B``::

    |<- local prefix-cache hit ->|<- tier hit (loaded) ->|<- computed here (stored) ->|last|
    0                       start*B                  end*B                     full*B     T

  * Only full prompt blocks are stored (their hash exists and their KV never changes).
  * A load never covers the last prompt token: the engine must compute at least one token to
    sample, so at most ``(T - 1) // B`` blocks are loadable.
  * Blocks that were hits (local or tier) are not stored again by this request.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ReqPlan:
    """What the scheduler-side connector remembers about one request."""

    num_prompt_tokens: int
    block_ids: list[int] = field(default_factory=list)
    next_store: int = 0  # first prompt block not yet handed to the store path
    load_start: int = 0  # first block loaded from the tier
    load_blocks: int = 0  # blocks loaded from the tier
    load_pending: bool = False  # a load op still has to be emitted
    stored_any: bool = False  # a store op was emitted (the worker reports it in finished_sending)


def loadable_blocks(num_tokens: int, block_size: int) -> int:
    """Full blocks that may be loaded for a prompt of ``num_tokens`` (the last token is computed)."""
    return max(0, (num_tokens - 1) // block_size)


def hit_run(present: list[bool], start: int, limit: int) -> int:
    """Length of the run of consecutive present blocks from ``start`` (exclusive ``limit``)."""
    n = 0
    for i in range(start, min(limit, len(present))):
        if not present[i]:
            break
        n += 1
    return n


def store_ranges(
    next_store: int, computed_tokens: int, num_prompt_tokens: int, block_size: int, chunk_blocks: int
) -> tuple[list[tuple[int, int]], int]:
    """Block ranges ``[lo, hi)`` that became full prompt blocks and are not yet stored.

    Args:
        next_store: first block not yet stored.
        computed_tokens: tokens whose KV exists after this step.
        num_prompt_tokens: prompt length.
        block_size: tokens per block.
        chunk_blocks: maximum blocks per range (one object-store object each).

    Returns:
        The ranges, and the new ``next_store``.
    """
    assert chunk_blocks > 0, "chunk_blocks must be positive"
    full = min(computed_tokens, num_prompt_tokens) // block_size
    ranges = [(lo, min(lo + chunk_blocks, full)) for lo in range(next_store, full, chunk_blocks)]
    return ranges, max(next_store, full)
