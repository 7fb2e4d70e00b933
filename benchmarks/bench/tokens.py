"""Deterministic prompt material: token ids and filler text derived from (seed, key).

Owns ``token_ids`` and ``words``. Both expand ``shake_128(f"{seed}/{key}")`` so the same seed and key
give the same output on every machine and Python run (no builtin ``hash()``, no global RNG state).
Token ids are drawn from ``[lo, hi)`` so any tokenizer with a vocabulary of at least ``hi`` accepts
them; the default 1000..30000 fits every tokenizer of 32K entries or more.

numpy, when installed, only speeds up the same arithmetic (little-endian uint32 mod span, plus lo);
the pure-Python path gives identical ids and a test checks that they agree.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from array import array

DEFAULT_VOCAB: tuple[int, int] = (1000, 30000)

# Short common English words: roughly one token each in BPE vocabularies, so word counts estimate
# token counts for chat workloads (the exact count comes back in ``usage.prompt_tokens``).
_WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "as", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "word", "but", "what", "some", "we", "can", "out", "other", "were", "all", "there", "when", "up", "use", "your", "how", "said", "an", "each", "she", "which", "do", "their", "time", "if", "will", "way", "about", "many", "then", "them", "write", "would", "like", "so", "these", "her", "long", "make", "thing", "see", "him", "two", "has", "look", "more", "day", "could", "go", "come", "did", "number", "sound", "no", "most", "people", "my", "over", "know", "water", "than", "call", "first", "who", "may", "down", "side", "been", "now", "find", "any", "new", "work", "part", "take", "get", "place", "made", "live", "where", "after", "back", "little", "only", "round", "man", "year", "came", "show", "every", "good", "me", "give", "our", "under", "name", "very", "through", "just", "form", "sentence", "great", "think", "say", "help", "low", "line", "differ", "turn", "cause", "much", "mean", "before", "move", "right", "boy", "old", "too", "same", "tell", "does", "set", "three", "want", "air", "well", "also", "play", "small", "end", "put", "home", "read", "hand", "port", "large", "spell", "add", "even", "land", "here", "must", "big", "high", "such", "follow", "act", "why", "ask", "men", "change", "went", "light", "kind", "off", "need", "house", "picture", "try", "us", "again", "animal", "point", "mother", "world", "near", "build", "self", "earth", "father", "head", "stand", "own", "page", "should", "country", "found", "answer", "school", "grow", "study", "still", "learn", "plant", "cover", "food", "sun", "four", "between", "state", "keep", "eye", "never", "last", "let", "thought", "city", "tree", "cross", "farm", "hard", "start", "might", "story", "saw", "far", "sea", "draw", "left", "late", "run", "while", "press", "close", "night", "real", "life", "few", "north", "open", "seem", "together", "next", "white", "children", "begin", "got", "walk", "example", "ease", "paper", "group", "always", "music", "those", "both", "mark", "often", "letter", "until", "mile", "river", "car", "feet", "care", "second", "book", "carry", "took", "science", "eat", "room", "friend", "began", "idea", "fish", "mountain"]  # noqa: E501

_np = __import__("numpy") if importlib.util.find_spec("numpy") else None

_U32 = array("I")
assert _U32.itemsize == 4, "array('I') must be 32-bit for deterministic token ids"


def _u32s(seed: int | str, key: str, n: int) -> array:
    values = array("I", hashlib.shake_128(f"{seed}/{key}".encode()).digest(4 * n))
    if sys.byteorder == "big":
        values.byteswap()
    return values


def token_ids(seed: int | str, key: str, n: int, vocab: tuple[int, int] = DEFAULT_VOCAB) -> list[int]:
    """Return ``n`` token ids in ``[vocab[0], vocab[1])``, a pure function of (seed, key, n, vocab).

    A shorter ``n`` with the same key is a prefix of a longer one.
    """
    lo, hi = vocab
    if not 0 <= lo < hi:
        raise ValueError(f"vocab range must satisfy 0 <= lo < hi, got {lo}:{hi}")
    if n <= 0:
        return []
    if _np is not None:
        raw = hashlib.shake_128(f"{seed}/{key}".encode()).digest(4 * n)
        return (_np.frombuffer(raw, dtype="<u4") % (hi - lo) + lo).tolist()
    return _token_ids_py(seed, key, n, lo, hi)


def _token_ids_py(seed: int | str, key: str, n: int, lo: int, hi: int) -> list[int]:
    span = hi - lo
    return [lo + v % span for v in _u32s(seed, key, n)]


def words(seed: int | str, key: str, n: int) -> str:
    """Return ``n`` space-separated filler words, a pure function of (seed, key, n)."""
    if n <= 0:
        return ""
    vocab = _WORDS
    size = len(vocab)
    return " ".join(vocab[v % size] for v in _u32s(seed, "w/" + key, n))
