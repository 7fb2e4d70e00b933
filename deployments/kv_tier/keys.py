"""Block keys of the KV tier: what makes two engines' KV blocks interchangeable.

Owns: ``Fingerprint`` and ``block_key``. Pure Python (no ray, torch or vllm imports).

A tier key is ``fingerprint digest (16 B) + tp rank (2 B) + vLLM block hash`` (32 B for sha256).
vLLM's block hash already chains the tokens, LoRA name, multimodal ids and ``cache_salt`` (first
block), so tenants that set different salts never share a key. The fingerprint adds everything
that makes the *bytes* of a block differ although the tokens are equal:

    model + revision, KV dtype, block size, hash algorithm + seed (NONE_HASH), TP size,
    the per-layer page shape (layers, bytes per block per layer, attention layout)

Invariant: two engines get the same fingerprint only if a block one of them stored can be
copied verbatim into the other's paged KV cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

FINGERPRINT_BYTES = 16


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Everything besides the block hash that decides whether a stored block is compatible."""

    model: str
    revision: str | None
    kv_dtype: str
    block_size: int
    hash_algo: str
    hash_seed: str | None
    tp_size: int = 1
    num_layers: int = 0
    page_bytes: int = 0  # bytes of one block of one layer
    layout: str = ""  # attention backend / page shape, e.g. "cpu:(3,128,128)"

    def digest(self) -> bytes:
        """A stable 16-byte digest (sha256 over the sorted field items)."""
        text = repr(sorted(asdict(self).items()))
        return hashlib.sha256(text.encode()).digest()[:FINGERPRINT_BYTES]


def block_key(fingerprint: bytes, block_hash: bytes, tp_rank: int = 0) -> bytes:
    """The tier key of one block of one TP rank."""
    assert len(fingerprint) == FINGERPRINT_BYTES, "fingerprint must be a Fingerprint.digest()"
    return fingerprint + tp_rank.to_bytes(2, "big") + bytes(block_hash)


def block_keys(fingerprint: bytes, block_hashes: list[bytes], tp_rank: int = 0) -> list[bytes]:
    """Tier keys of consecutive blocks of one TP rank."""
    head = fingerprint + tp_rank.to_bytes(2, "big")
    return [head + bytes(h) for h in block_hashes]
