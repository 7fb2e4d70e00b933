"""Block keys of the KV tier: only compatible engines and equal salts share a key (pure)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from deployments.kv_tier.directory import BlockDirectory
from deployments.kv_tier.keys import FINGERPRINT_BYTES, Fingerprint, block_key, block_keys

pytestmark = pytest.mark.unit

BASE = Fingerprint(model="smollm2", revision=None, kv_dtype="torch.float32", block_size=128,
                   hash_algo="sha256", hash_seed="0", tp_size=1, num_layers=30, page_bytes=196608,
                   layout="FullAttentionSpec:3x64")


def _chain(tokens: list[int], block_size: int, salt: str | None) -> list[bytes]:
    """A stand-in for vLLM's chained block hash (salt enters the first block's extra keys)."""
    out, parent = [], b"none"
    for i in range(len(tokens) // block_size):
        extra = (salt,) if (salt and i == 0) else None
        parent = hashlib.sha256(
            repr((parent, tuple(tokens[i * block_size:(i + 1) * block_size]), extra)).encode()).digest()
        out.append(parent)
    return out


def test_digest_is_stable_and_sized():
    assert BASE.digest() == dataclasses.replace(BASE).digest()
    assert len(BASE.digest()) == FINGERPRINT_BYTES


@pytest.mark.parametrize("change", [
    {"kv_dtype": "torch.bfloat16"}, {"block_size": 16}, {"model": "other"}, {"revision": "abc"},
    {"hash_algo": "xxhash"}, {"hash_seed": "1"}, {"tp_size": 2}, {"page_bytes": 65536},
    {"num_layers": 32}, {"layout": "FullAttentionSpec:8x128"},
])
def test_any_incompatibility_changes_the_fingerprint(change):
    assert dataclasses.replace(BASE, **change).digest() != BASE.digest()


def test_directory_misses_across_fingerprints_salts_and_ranks():
    tokens = list(range(1000))
    hashes = _chain(tokens, 128, salt=None)
    d = BlockDirectory(1 << 30)
    d.add_chunk("A", block_keys(BASE.digest(), hashes), "ref", 1000)
    assert d.lookup(block_keys(BASE.digest(), hashes)) == [True] * len(hashes)
    # Different dtype / block size: different fingerprint, no hit.
    for other in (dataclasses.replace(BASE, kv_dtype="torch.bfloat16"), dataclasses.replace(BASE, block_size=64)):
        assert not any(d.lookup(block_keys(other.digest(), hashes)))
    # Another tenant's salt changes every chained hash: no hit.
    assert not any(d.lookup(block_keys(BASE.digest(), _chain(tokens, 128, salt="tenant-b"))))
    # Another TP rank's shard is another key.
    assert not any(d.lookup(block_keys(BASE.digest(), hashes, tp_rank=1)))


def test_block_key_layout():
    h = bytes(range(32))
    k = block_key(BASE.digest(), h, tp_rank=3)
    assert k == BASE.digest() + b"\x00\x03" + h
    assert block_keys(BASE.digest(), [h], 3) == [k]
