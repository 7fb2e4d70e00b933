"""Block hashes equal vLLM's own, for every algorithm, salt and block size (vLLM imported here only)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from routers import hashing

pytestmark = pytest.mark.unit

vllm_hashing = pytest.importorskip("vllm.utils.hashing")
kv_cache_utils = pytest.importorskip("vllm.v1.core.kv_cache_utils")


def _algos() -> list[str]:
    return [a for a in hashing.ALGOS if "xxhash" not in a or hashing.xxhash is not None]


def _vllm_hashes(monkeypatch, tokens, block_size, *, algo, seed, salt=None, lora_name=None) -> list[int]:
    """Hashes through vLLM's request block hasher (the code path the scheduler runs)."""
    monkeypatch.setenv("PYTHONHASHSEED", seed)
    fn = vllm_hashing.get_hash_fn_by_name(algo)
    kv_cache_utils.init_none_hash(fn)
    lora = SimpleNamespace(lora_name=lora_name, adapter_name=lora_name) if lora_name else None
    request = SimpleNamespace(
        block_hashes=[],
        num_tokens=len(tokens),
        all_token_ids=list(tokens),
        mm_features=[],
        lora_request=lora,
        cache_salt=salt,
        prompt_embeds=None,
    )
    hasher = kv_cache_utils.get_request_block_hasher(block_size, fn)
    return [kv_cache_utils.maybe_convert_block_hash(h) for h in hasher(request)]


@pytest.mark.parametrize("algo", _algos())
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("salt", [None, "tenant-a"])
def test_block_hashes_equal_vllm(monkeypatch, algo, block_size, salt):
    rng = random.Random(block_size)
    tokens = [rng.randrange(0, 150_000) for _ in range(3 * block_size + block_size // 2)]  # + partial block
    ours = hashing.block_hashes(tokens, block_size, salt=salt, algo=algo, seed="0")
    assert ours == _vllm_hashes(monkeypatch, tokens, block_size, algo=algo, seed="0", salt=salt)
    assert len(ours) == 3


@pytest.mark.parametrize("algo", _algos())
def test_memoised_hasher_equals_vllm_and_stays_bounded(monkeypatch, algo):
    hasher = hashing.BlockHasher(algo=algo, seed="0", max_entries=8)
    rng = random.Random(3)
    shared = [rng.randrange(0, 150_000) for _ in range(64)]
    for i in range(4):
        tokens = shared + [rng.randrange(0, 150_000) for _ in range(40 + i)]
        for salt in (None, "t"):
            expected = _vllm_hashes(monkeypatch, tokens, 16, algo=algo, seed="0", salt=salt)
            assert hasher(tokens, 16, salt=salt) == expected
            assert hasher(tokens, 16, salt=salt) == expected  # from the memo
    assert len(hasher) == 8


def test_seed_changes_root_as_in_vllm(monkeypatch):
    tokens = list(range(64))
    ours = hashing.block_hashes(tokens, 16, seed="12345")
    assert ours == _vllm_hashes(monkeypatch, tokens, 16, algo="sha256", seed="12345")
    assert ours != hashing.block_hashes(tokens, 16, seed="0")


def test_lora_name_is_an_extra_key_on_every_block(monkeypatch):
    tokens = list(range(48))
    ours = hashing.block_hashes(tokens, 16, salt="s", lora_name="adapter-1")
    assert ours == _vllm_hashes(monkeypatch, tokens, 16, algo="sha256", seed="0", salt="s", lora_name="adapter-1")


def test_salt_changes_every_block_through_the_chain():
    tokens = list(range(64))
    plain, salted = hashing.block_hashes(tokens, 16), hashing.block_hashes(tokens, 16, salt="x")
    assert all(a != b for a, b in zip(plain, salted, strict=True))


def test_hashes_are_low_64_bits_of_the_digest():
    digests = hashing.block_digests(list(range(32)), 16)
    assert hashing.block_hashes(list(range(32)), 16) == [int.from_bytes(d[-8:], "big") for d in digests]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        hashing.block_hashes([1, 2], 0)
    with pytest.raises(ValueError):
        hashing.block_hashes([1, 2], 1, algo="md5")
