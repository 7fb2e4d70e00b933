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
  * Blocks that were hits (local or tier) are not stored again by this request, and blocks the
    directory already held at lookup time are not copied again (one copy per prefix, cluster-wide).
  * On a busy step (more scheduled requests than ``store_busy_requests``) the store path is the
    main cost the tier adds to a workload without reuse (H100: 0.86x throughput with every prompt
    block stored), so a busy step admits at most a small block budget, lowest block index first
    (the shared part of prompts is their beginning). What a busy step cuts is offered again by the
    request's later steps (``next_store`` goes back to the first block not admitted; its blocks stay
    allocated while it runs), so under sustained load a prompt still reaches the tier in full, at
    most the budget per step; a request that finishes first leaves the rest to the next request
    with that prefix. Idle and lightly loaded steps store everything.
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
    present: list[bool] = field(default_factory=list)  # tier presence per block at lookup time


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


def skip_present(lo: int, hi: int, present: list[bool]) -> int:
    """First block of ``[lo, hi)`` that the tier did not hold at lookup time (leading hits skipped)."""
    while lo < hi and lo < len(present) and present[lo]:
        lo += 1
    return lo


def admit_stores(cands: list[tuple[str, int, int]], busy: bool,
                 budget_blocks: int) -> tuple[list[tuple[str, int, int]], dict[str, int]]:
    """Which candidate store ranges ``(req_id, lo, hi)`` run this step.

    Not busy: all of them. Busy: at most ``budget_blocks`` blocks, lowest ``lo`` first (a range may
    be cut short). Returns the admitted ranges and, per request that lost (part of) a range, the
    first block it did not get: its later ranges are not admitted either (a hit needs an unbroken
    run from block 0), and its next step offers them again from there.
    """
    if not busy:
        return list(cands), {}
    out: list[tuple[str, int, int]] = []
    resume: dict[str, int] = {}
    left = max(0, budget_blocks)
    for rid, lo, hi in sorted(cands, key=lambda c: c[1]):
        if rid in resume:
            continue
        take = min(hi - lo, left)
        if take > 0:
            out.append((rid, lo, lo + take))
            left -= take
        if take < hi - lo:
            resume[rid] = lo + take
    return out, resume


def copy_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """``(src0, dst0, length)`` runs where both indices step by one (a chunk's blocks -> cache ids)."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs
