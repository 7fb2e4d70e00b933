"""Bounded priming of vLLM's incremental detokenizer: the streamed text is the one whole-prompt priming gives.

The detokenizer under test is vLLM's own ``FastIncrementalDetokenizer`` (as ``AsyncLLM``'s output processor builds
it), once with ``tokenizers``' ``DecodeStream`` and once with ``BoundedDecodeStream`` installed, over tokenizers of
the three decoder families served models use: byte-level BPE (Llama 3, SmolLM2, GPT-2), SentencePiece-style
Metaspace with byte fallback (Llama 2, Mistral) and WordPiece; plus the SmolLM2 tokenizer the integration tests serve
when ``kvserve prepare-model`` wrote it.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import tokenizers.decoders
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from deployments.detokenizer_priming import BoundedDecodeStream, bound_detokenizer_priming
from serve_app import settings

vllm_detok = pytest.importorskip("vllm.v1.engine.detokenizer")
transformers = pytest.importorskip("transformers")
from vllm import SamplingParams

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. naïve café résumé, 1234 + 5678 = 6912!\n",
    "日本語のテキストと中文文本 and emoji 🙂🚀👩‍💻 mixed with code: def f(x): return x ** 2\n",
    "Привет мир. Γειά σου κόσμε. مرحبا بالعالم. ",
] * 30
_SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def _byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _metaspace_byte_fallback() -> Tokenizer:
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trained.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=_SPECIALS))
    state = json.loads(trained.to_str())["model"]
    vocab = dict(state["vocab"])
    for b in range(256):  # byte-fallback pieces are plain vocabulary entries, as in Llama 2's tokenizer
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(_SPECIALS)
    return tok


def _wordpiece() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_CORPUS, trainers.WordPieceTrainer(vocab_size=600, special_tokens=_SPECIALS))
    return tok


def _smollm2() -> Tokenizer:
    path = settings.model_dir() / "smollm2-135m-instruct" / "tokenizer.json"
    if not path.exists():
        pytest.skip("SmolLM2 not prepared (kvserve prepare-model)")
    return Tokenizer.from_file(str(path))


TOKENIZERS = {"byte_level": _byte_level, "metaspace_byte_fallback": _metaspace_byte_fallback,
              "wordpiece": _wordpiece, "smollm2": _smollm2}


def _stream(tok: Tokenizer, prompt: list[int], output: list[int], skip_special: bool) -> list[str]:
    """The text deltas vLLM's detokenizer streams for ``output`` after ``prompt``, one per token."""
    backend = transformers.TokenizersBackend(tokenizer_object=tok)
    params = SamplingParams(max_tokens=len(output), skip_special_tokens=skip_special,
                            spaces_between_special_tokens=skip_special)
    req = SimpleNamespace(request_id="r", prompt_token_ids=prompt, prompt_embeds=None, sampling_params=params,
                          arrival_time=0.0)
    detok = vllm_detok.IncrementalDetokenizer.from_new_request(backend, req)
    assert isinstance(detok, vllm_detok.FastIncrementalDetokenizer)
    deltas = []
    for i, token in enumerate(output):
        detok.update([token], False)
        deltas.append(detok.get_next_output_text(finished=i == len(output) - 1, delta=True))
    return deltas


def _fragments(tok: Tokenizer) -> list[int]:
    """Tokens that hold part of a UTF-8 sequence (they decode to a replacement character on their own)."""
    return [i for i in range(tok.get_vocab_size()) if tok.decode([i]).endswith("\ufffd")]


def _cases(tok: Tokenizer, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """Prompts whose text ends with a whole character (a chat template's header does), and outputs."""
    vocab = tok.get_vocab_size()
    text = "".join(rng.sample(_CORPUS, 8))
    end = tok.encode(" end.").ids
    fragments = _fragments(tok)
    cases = [
        (tok.encode(text * 6).ids, tok.encode(" 日本語 🙂 and the fox. Привет 👩‍💻").ids),  # text after text
        ([rng.randrange(vocab) for _ in range(3000)] + end, [rng.randrange(vocab) for _ in range(60)]),  # random
        (tok.encode(text * 6).ids, [rng.randrange(vocab) for _ in range(60)]),
    ]
    if fragments:  # tokens holding part of a UTF-8 sequence, in a row and mixed
        cases.append((tok.encode(text * 6).ids, [rng.choice(fragments) for _ in range(20)]))
        cases.append(([rng.randrange(vocab) for _ in range(2000)] + end,
                      [rng.choice(fragments + list(range(vocab))) for _ in range(60)]))
    return cases


@pytest.fixture
def restore_decode_stream():
    original = tokenizers.decoders.DecodeStream
    yield
    tokenizers.decoders.DecodeStream = original


@pytest.mark.parametrize("family", sorted(TOKENIZERS))
@pytest.mark.parametrize("skip_special", [True, False])
@pytest.mark.parametrize("bound", [1, 8, 128])
def test_streamed_text_equals_whole_prompt_priming(family, skip_special, bound, restore_decode_stream):
    tok = TOKENIZERS[family]()
    rng = random.Random(f"{family}-{skip_special}-{bound}")
    texts = []
    for prompt, output in _cases(tok, rng):
        bound_detokenizer_priming(None)
        whole = _stream(tok, prompt, output, skip_special)
        bound_detokenizer_priming(bound)
        bounded = _stream(tok, prompt, output, skip_special)
        assert bounded == whole
        texts.append("".join(whole))
    assert all(texts[:3])  # text and random outputs stream text (fragments alone may stream none)


@pytest.mark.parametrize("family", ["byte_level", "metaspace_byte_fallback"])
def test_prompt_ending_mid_character_leaks_less(family, restore_decode_stream):
    """A prompt ending inside a character: vLLM's first delta repeats the prompt's text (vllm-project/vllm#48853);
    bounded, it repeats at most the tail's, and every later delta is the same."""
    tok = TOKENIZERS[family]()
    rng = random.Random(family)
    prompt = tok.encode("".join(_CORPUS[:6]) * 4).ids + [rng.choice(_fragments(tok))]
    output = tok.encode(" the fox 🙂 jumps").ids
    bound_detokenizer_priming(None)
    whole = _stream(tok, prompt, output, True)
    bound_detokenizer_priming(16)
    bounded = _stream(tok, prompt, output, True)
    assert len(whole[0]) > 1000 and len(bounded[0]) <= len(tok.decode(prompt[-16:] + output[:1])) + 1
    assert bounded[1:] == whole[1:]


def test_vllm_primes_through_the_bound(restore_decode_stream):
    seen: list[int | None] = []

    def recording(ids=None, skip_special_tokens=False):
        seen.append(None if ids is None else len(ids))
        return ORIGINAL(ids=ids, skip_special_tokens=skip_special_tokens)

    ORIGINAL = tokenizers.decoders.DecodeStream
    tokenizers.decoders.DecodeStream = BoundedDecodeStream(recording, 128)
    tok = _byte_level()
    prompt = tok.encode("".join(_CORPUS)).ids
    assert len(prompt) > 1000
    assert "".join(_stream(tok, prompt, tok.encode(" the fox").ids, True)) == " the fox"
    assert seen == [128]


def test_install_is_idempotent_and_reversible(restore_decode_stream):
    original = tokenizers.decoders.DecodeStream
    bound_detokenizer_priming(64)
    first = tokenizers.decoders.DecodeStream
    assert isinstance(first, BoundedDecodeStream) and first.original is original
    bound_detokenizer_priming(64)
    assert tokenizers.decoders.DecodeStream is first
    bound_detokenizer_priming(32)  # another bound wraps the original, never the previous shim
    assert tokenizers.decoders.DecodeStream.original is original
    assert tokenizers.decoders.DecodeStream.max_prompt_tokens == 32
    bound_detokenizer_priming(None)
    assert tokenizers.decoders.DecodeStream is original
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        BoundedDecodeStream(original, 0)


def test_short_prompts_and_resets_are_built_as_asked():
    calls = []
    shim = BoundedDecodeStream(lambda ids=None, skip_special_tokens=False: calls.append((ids, skip_special_tokens)), 4)
    shim(ids=[1, 2, 3], skip_special_tokens=True)
    shim(ids=[1, 2, 3, 4, 5, 6], skip_special_tokens=False)
    shim(skip_special_tokens=True)  # vLLM's reset after an invalid-prefix error
    assert calls == [([1, 2, 3], True), ([3, 4, 5, 6], False), (None, True)]
