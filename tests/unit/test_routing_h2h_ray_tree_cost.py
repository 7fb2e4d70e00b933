"""benchmarks/routing_h2h/ray_tree_cost.py: the GPU cells' prompts as Ray's router sees them, and the tree timings."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree")

from benchmarks.routing_h2h import ray_tree_cost as rtc  # after the skip: it imports Ray's prefix tree


def test_prompt_text_is_one_character_per_token():
    text = rtc.prompt_text((1, 2), 40)
    assert len(text) == 40
    assert rtc.prompt_text((1, 2), 40)[:32] == text[:32]
    assert rtc.prompt_text((1, 3), 40)[:16] == text[:16] and rtc.prompt_text((1, 3), 40)[16:32] != text[16:32]


def test_multiturn_prompts_extend_their_sessions_earlier_turns():
    texts = rtc.prompts("multiturn", 200)
    assert len(texts) == 200

    def extends(i):  # a later turn: an earlier, shorter prompt is its prefix (to the block)
        return any(len(a) < len(texts[i]) and texts[i].startswith(a[: len(a) // 16 * 16]) for a in texts[:i])

    openers = [i for i in range(len(texts)) if not extends(i)]
    # one opening turn per session, each with its own system prompt; the clients' 64 sessions interleave
    assert len({texts[i][:64] for i in openers}) == len(openers)
    assert len({t[:64] for t in texts}) == len(openers)
    assert 40 <= len(openers) <= 110


def test_docqa_prompts_share_their_documents():
    texts = rtc.prompts("docqa", 100)
    docs = {t[:1024] for t in texts}
    assert 1 < len(docs) <= 24  # 100 questions over the cell's 24 documents


def test_measure_decides_by_match_and_times_every_call():
    texts = rtc.prompts("docqa", 60)
    out = rtc.measure(texts)
    assert out["prefix_match"]["count"] == out["insert"]["count"] == 60
    # only prompts whose document no tenant holds go to the smallest tenants: at most the 24 documents' first sends
    assert 1 <= out["get_smallest_tenants"]["count"] <= 24
    assert out["prefix_match"]["p50"] > 0
