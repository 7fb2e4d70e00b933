"""Prompt block hashes, computed exactly as vLLM's prefix cache computes them.

Owns: ``block_hashes`` (the router's view of a prompt), ``BlockHasher`` (the same with a bounded
memo of recent blocks, for the request path) and ``hash_object`` (the four vLLM hash functions). The
router, the KV tier and the engine must name the same prefix with the same keys, so this module mirrors
``vllm/v1/core/kv_cache_utils.py`` (``init_none_hash``, ``hash_block_tokens``,
``generate_block_hash_extra_keys``) and ``vllm/utils/hashing.py``; a unit test checks equality against
vLLM's own functions.

Algorithm (vLLM v1, single KV-cache group)::

    root     = H(seed)                     # seed = PYTHONHASHSEED string given to every replica
    h[0]     = H((root,   tuple(tokens[0:B]),   extra[0]))
    h[i]     = H((h[i-1], tuple(tokens[iB:iB+B]), extra[i]))   # full blocks only
    extra[i] = (cache_salt,) on block 0 when a salt is set, else None (LoRA name first if any)

``H`` is ``prefix_caching_hash_algo``: ``sha256`` (pickle protocol 5, vLLM's default),
``sha256_cbor`` (canonical CBOR), ``xxhash`` (xxh3-128 over pickle) or ``xxhash_cbor``. The chain
runs on full digests; the values returned are the low 64 bits (``int.from_bytes(d, "big") & 2**64-1``),
which is what vLLM's KV events carry (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``, its default).

Invariant: the seed must be set (vLLM draws a random root when PYTHONHASHSEED is unset, and then no
router can agree with it); block_size must be the engine's hash block size (``block_size`` × DCP).
"""

from __future__ import annotations

import functools
import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import cbor2

try:  # optional, as in vLLM: only the xxhash algos need it
    import xxhash
except ImportError:  # pragma: no cover - depends on the environment
    xxhash = None

ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
_LOW64 = (1 << 64) - 1


def _pickle(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _cbor(obj: Any) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def _xxh3_128(data: bytes) -> bytes:
    if xxhash is None:
        raise ValueError("the xxhash algos need the `xxhash` package (pip install xxhash)")
    return xxhash.xxh3_128_digest(data)


_HASHERS: dict[str, Callable[[Any], bytes]] = {
    "sha256": lambda obj: hashlib.sha256(_pickle(obj)).digest(),
    "sha256_cbor": lambda obj: hashlib.sha256(_cbor(obj)).digest(),
    "xxhash": lambda obj: _xxh3_128(_pickle(obj)),
    "xxhash_cbor": lambda obj: _xxh3_128(_cbor(obj)),
}


def hash_object(obj: Any, algo: str = "sha256") -> bytes:
    """Digest of ``obj`` with vLLM's ``prefix_caching_hash_algo`` named ``algo``."""
    try:
        return _HASHERS[algo](obj)
    except KeyError:
        raise ValueError(f"unknown hash algo {algo!r}; expected one of {ALGOS}") from None


@functools.cache
def root_hash(seed: str, algo: str = "sha256") -> bytes:
    """vLLM's ``NONE_HASH``: the parent of every first block, ``H(PYTHONHASHSEED)``."""
    return hash_object(seed, algo)


def to_int64(digest: bytes) -> int:
    """The low 64 bits of a digest, as vLLM's KV events report block hashes."""
    return int.from_bytes(digest, "big") & _LOW64


def block_digests(
    token_ids: Sequence[int],
    block_size: int,
    *,
    salt: str | None = None,
    algo: str = "sha256",
    seed: str = "0",
    lora_name: str | None = None,
) -> list[bytes]:
    """Full chained digests of every full block of ``token_ids`` (vLLM's ``BlockHash`` values)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if seed is None:
        raise ValueError("seed is required: vLLM's root hash is random when PYTHONHASHSEED is unset")
    hasher = _HASHERS.get(algo)
    if hasher is None:
        raise ValueError(f"unknown hash algo {algo!r}; expected one of {ALGOS}")
    tokens = list(map(int, token_ids))  # numpy ints would pickle differently from vLLM's Python ints
    lora_keys = [lora_name] if lora_name else []
    first_extra = tuple(lora_keys + ([salt] if salt else [])) or None
    rest_extra = tuple(lora_keys) or None
    parent = root_hash(seed, algo)
    out: list[bytes] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        extra = first_extra if start == 0 else rest_extra
        parent = hasher((parent, tuple(tokens[start : start + block_size]), extra))
        out.append(parent)
    return out


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    *,
    salt: str | None = None,
    algo: str = "sha256",
    seed: str = "0",
    lora_name: str | None = None,
) -> list[int]:
    """The prompt's chained block hashes as 64-bit ints, equal to vLLM's KV-event hashes.

    Args:
        token_ids: the prompt exactly as the engine receives it (after the chat template).
        block_size: the engine's KV block size in tokens (``ReplicaStats.block_size``).
        salt: the request's ``cache_salt`` (mixed into the first block only).
        algo: the engine's ``prefix_caching_hash_algo``.
        seed: the engine processes' ``PYTHONHASHSEED`` (``RoutingConfig.hash_seed``).
        lora_name: the LoRA adapter name, if the request uses one.

    Returns:
        One int per full block; a trailing partial block is not hashed (vLLM never caches it).
    """
    digests = block_digests(token_ids, block_size, salt=salt, algo=algo, seed=seed, lora_name=lora_name)
    return [int.from_bytes(d, "big") & _LOW64 for d in digests]


class BlockHasher:
    """``block_hashes`` with a bounded memo: blocks of recently seen prefixes are not re-hashed.

    Shared prefixes (documents, system prompts, chat history) dominate the workloads that routing
    helps, and pickling + sha256 of every block costs ~0.1 ms per 1K tokens; a memo hit is a
    tuple hash and a dict lookup (~6x faster). Keyed on (parent digest, block tokens, extra keys),
    so a hit is exact. At most ``max_entries`` blocks are kept (oldest inserted dropped first,
    ~350 bytes each). One instance per process/owner; not shared across threads.
    """

    def __init__(self, *, algo: str = "sha256", seed: str = "0", max_entries: int = 65_536) -> None:
        if algo not in _HASHERS:
            raise ValueError(f"unknown hash algo {algo!r}; expected one of {ALGOS}")
        self._hasher = _HASHERS[algo]
        self._root = root_hash(seed, algo)
        self._max = max_entries
        self._memo: OrderedDict[tuple, bytes] = OrderedDict()  # insertion order: popitem(last=False) is O(1)

    def __call__(self, token_ids: Sequence[int], block_size: int, *, salt: str | None = None) -> list[int]:
        """Same result as ``block_hashes(token_ids, block_size, salt=salt, algo=..., seed=...)``.

        Keys chain on the parent's digest, so once one block of a prompt misses the memo every later block misses
        too: those are hashed and remembered without being looked up.
        """
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        tokens = list(map(int, token_ids))  # plain ints (numpy's pickle differently), sliced as tuples below
        memo, hasher, most = self._memo, self._hasher, self._max
        parent, extra, out = self._root, ((salt,) if salt else None), []
        missed = False
        for start in range(0, len(tokens) - block_size + 1, block_size):
            key = (parent, tuple(tokens[start : start + block_size]), extra)
            digest = None if missed else memo.get(key)
            if digest is None:
                missed = True
                digest = memo[key] = hasher(key)
                if len(memo) > most:
                    memo.popitem(last=False)
            out.append(int.from_bytes(digest, "big") & _LOW64)
            parent, extra = digest, None
        return out

    def __len__(self) -> int:
        return len(self._memo)

    @property
    def max_entries(self) -> int:
        return self._max
