"""A replica's own guess of how much of a prompt its engine holds, before the engine says.

Owns ``PrefixView``: the block hashes of the prompts this replica served recently (vLLM's hashes, from the
request or computed here with the engine's block size, salt, algorithm and seed), in an LRU sized like the
engine's KV cache (``routers.approx_index.ApproxIndex`` with this replica as its one member). The replica
counts only a prompt's uncached part as queued prefill work in its stats, until the engine reports the real
figure with the first output. The view is the replica's own, so it sees the requests of every ingress
replica, and nothing crosses from the router to the replica for it.
"""

from __future__ import annotations

from collections.abc import Sequence

from routers.approx_index import ApproxIndex
from routers.hashing import BlockHasher

_ME = "self"


class PrefixView:
    """Leading cached tokens of a prompt, as far as this replica's recent history tells."""

    def __init__(self, *, block_size: int, num_gpu_blocks: int, algo: str, seed: str) -> None:
        self.block_size = block_size
        self._index = ApproxIndex(default_capacity_blocks=max(num_gpu_blocks, 1))
        self._hasher = BlockHasher(algo=algo, seed=seed)

    def hashes(self, token_ids: Sequence[int], given: Sequence[int], salt: str | None) -> Sequence[int]:
        """The prompt's block hashes: those the ingress computed, else computed here."""
        return given or self._hasher(token_ids, self.block_size, salt=salt)

    def cached_tokens(self, hashes: Sequence[int]) -> int:
        return self._index.match(hashes, (_ME,)).get(_ME, 0) * self.block_size

    def served(self, hashes: Sequence[int], now: float) -> None:
        """The engine now holds these blocks (the prompt was prefilled)."""
        self._index.on_routed(_ME, hashes, now)
