"""Unit tests of the benchmark workloads: determinism, exact lengths, sharing and scaling."""

from __future__ import annotations

import json
from itertools import islice

import pytest

from benchmarks.bench.tokens import token_ids, words
from benchmarks.bench.workloads import DocQAWorkload, MooncakeWorkload, MultiTurnWorkload, RandomWorkload, make_workload

pytestmark = pytest.mark.unit


def first_requests(workload, n):
    return [s.next_request(None) for s in islice(workload.sessions(), n)]


def make_trace(tmp_path, rows):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TRACE = [
    {"timestamp": 0, "input_length": 1200, "output_length": 50, "hash_ids": [0, 1, 2]},
    {"timestamp": 1000, "input_length": 1500, "output_length": 70, "hash_ids": [0, 1, 3]},
    {"timestamp": 2500, "input_length": 300, "output_length": 5, "hash_ids": [7]},
    {"timestamp": 4000, "input_length": 1024, "output_length": 400, "hash_ids": [0, 9]},
]


def test_token_ids_deterministic_in_range_and_prefix_stable():
    a = token_ids(7, "k", 1000, (1000, 30000))
    assert a == token_ids(7, "k", 1000, (1000, 30000))
    assert all(1000 <= t < 30000 for t in a)
    assert token_ids(7, "k", 10, (1000, 30000)) == a[:10]
    assert token_ids(8, "k", 10) != a[:10]
    assert token_ids(7, "other", 10) != a[:10]
    assert words(1, "x", 5) == words(1, "x", 5) and len(words(1, "x", 5).split()) == 5
    with pytest.raises(ValueError):
        token_ids(0, "k", 3, (5, 5))


def test_token_ids_numpy_and_python_paths_agree():
    from benchmarks.bench import tokens

    for seed, key, n, vocab in [(0, "a", 700, (1000, 30000)), (5, "mooncake/block/3", 512, (0, 49152)),
                                (1, "x", 3, (7, 8))]:
        assert tokens._token_ids_py(seed, key, n, *vocab) == token_ids(seed, key, n, vocab)
    assert token_ids(0, "a", 5) == [8053, 8585, 7364, 6069, 6759]  # golden: results stay comparable


def test_random_exact_lengths_unique_and_deterministic():
    wl = RandomWorkload(input_len=1024, output_len=128, seed=3, vocab=(1000, 30000))
    reqs = first_requests(wl, 5)
    assert all(r.api == "completions" and len(r.prompt) == 1024 == r.input_tokens and r.max_tokens == 128
               for r in reqs)
    assert len({tuple(r.prompt[:16]) for r in reqs}) == 5
    assert [r.prompt for r in first_requests(RandomWorkload(1024, 128, seed=3), 5)] == [r.prompt for r in reqs]
    assert first_requests(RandomWorkload(1024, 128, seed=4), 1)[0].prompt != reqs[0].prompt
    warm = wl.warmup(3)
    assert len(warm) == 3 and all(w.prompt[:16] != r.prompt[:16] for w in warm for r in reqs)


def test_docqa_shares_documents_and_control_does_not():
    wl = DocQAWorkload(num_docs=2, doc_tokens=(4096, 8192), question_tokens=(32, 64), output_len=16, seed=1)
    reqs = first_requests(wl, 20)
    doc_lens = wl.params()["doc_lens"]
    assert all(4096 <= n <= 8192 for n in doc_lens)
    by_doc = {}
    for r in reqs:
        doc = int(r.tag.rsplit("/", 1)[1])
        n = doc_lens[doc]
        assert 32 <= r.input_tokens - n <= 64 and len(r.prompt) == r.input_tokens
        by_doc.setdefault(doc, r.prompt[:n])
        assert r.prompt[:n] == by_doc[doc]
    assert len(by_doc) == 2
    assert [r.prompt for r in first_requests(DocQAWorkload(num_docs=2, seed=1, output_len=16), 20)] == \
        [r.prompt for r in reqs]
    solo = first_requests(DocQAWorkload(num_docs=2, seed=1, output_len=16, no_sharing=True), 20)
    assert [r.input_tokens for r in solo] == [r.input_tokens for r in reqs]
    assert len({tuple(r.prompt[:64]) for r in solo}) == 20


def test_docqa_chat_mode_builds_messages():
    r = first_requests(DocQAWorkload(num_docs=1, doc_tokens=(100, 100), api="chat"), 1)[0]
    assert r.api == "chat" and r.prompt is None and [m["role"] for m in r.messages] == ["system", "user"]
    assert len(r.messages[0]["content"].split()) > 100


def test_multiturn_history_grows_with_answers_and_nonce_control():
    wl = MultiTurnWorkload(num_sessions=3, turns=3, system_words=20, user_words=(5, 9), output_len=8, seed=2)
    sessions = list(wl.sessions())
    assert len(sessions) == 3 and len({s.session_id for s in sessions}) == 3
    s = sessions[0]
    t1 = s.next_request(None)
    t2 = s.next_request("first answer")
    t3 = s.next_request("second answer")
    assert s.next_request("third") is None
    assert [len(t.messages) for t in (t1, t2, t3)] == [2, 4, 6]
    assert t2.messages[:2] == t1.messages and t2.messages[2] == {"role": "assistant", "content": "first answer"}
    assert t3.messages[:4] == t2.messages and t1.session_id == s.session_id
    again = list(MultiTurnWorkload(num_sessions=3, turns=3, system_words=20, user_words=(5, 9), seed=2).sessions())
    assert again[1].next_request(None).messages == sessions[1].next_request(None).messages
    solo = next(MultiTurnWorkload(num_sessions=1, turns=2, system_words=20, no_sharing=True).sessions())
    a, b = solo.next_request(None), solo.next_request("x")
    assert a.messages[0]["content"].split("\n")[0] != b.messages[0]["content"].split("\n")[0]


def test_mooncake_block_sharing_preserved(tmp_path):
    wl = MooncakeWorkload(path=make_trace(tmp_path, TRACE), block_tokens=512)
    reqs = first_requests(wl, 4)
    assert [len(r.prompt) for r in reqs] == [1200, 1500, 300, 1024]
    assert [r.max_tokens for r in reqs] == [50, 70, 5, 400]
    a, b, c, d = (r.prompt for r in reqs)
    assert a[:1024] == b[:1024] and a[1024:1200] != b[1024:1200]
    assert d[:512] == a[:512] and d[512:1024] != a[512:1024]
    assert c[:300] != a[:300]
    block0 = token_ids(0, "mooncake/block/0", 512)
    assert a[:512] == block0
    assert [r.arrival_s for r in reqs] == [0.0, 1.0, 2.5, 4.0]


def test_mooncake_scaling_and_limits(tmp_path):
    path = make_trace(tmp_path, TRACE)
    wl = MooncakeWorkload(path=path, block_tokens=64, max_input_tokens=150, output_scale=0.5,
                          max_output_tokens=100, time_scale=10.0, start=1, limit=2)
    reqs = first_requests(wl, 10)
    assert len(reqs) == 2
    assert [len(r.prompt) for r in reqs] == [150, 38]  # 1500*64/512=187.5 -> capped 150; ceil(300/8)=38
    assert [r.max_tokens for r in reqs] == [35, 2]
    assert [r.arrival_s for r in reqs] == [0.0, 0.15]
    full = first_requests(MooncakeWorkload(path=path, block_tokens=64), 4)
    assert [len(r.prompt) for r in full] == [150, 188, 38, 128]
    assert full[0].prompt[:128] == full[1].prompt[:128] == full[3].prompt[:64] + full[0].prompt[64:128]
    assert full[0].prompt[128:150] != full[1].prompt[128:150]


def test_mooncake_no_sharing_keeps_lengths(tmp_path):
    path = make_trace(tmp_path, TRACE)
    shared = first_requests(MooncakeWorkload(path=path), 4)
    solo = first_requests(MooncakeWorkload(path=path, no_sharing=True), 4)
    assert [len(r.prompt) for r in solo] == [len(r.prompt) for r in shared]
    assert solo[0].prompt[:512] != solo[1].prompt[:512]


def test_mooncake_real_trace_first_lines():
    from serve_app import settings

    if not settings.mooncake_trace().is_file():  # a plain clone has no ../shared beside it
        pytest.skip(f"the Mooncake trace is not at {settings.mooncake_trace()} (KVSERVE_MOONCAKE_TRACE)")
    wl = MooncakeWorkload(block_tokens=16, max_input_tokens=2000, limit=50)
    reqs = first_requests(wl, 50)
    assert len(reqs) == 50 and all(1 <= len(r.prompt) <= 2000 for r in reqs)
    assert reqs[0].prompt[:16] == reqs[1].prompt[:16]  # both start with hash id 0


def test_workload_errors():
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("nope")
    with pytest.raises(ValueError, match="doc_tokens"):
        DocQAWorkload(doc_tokens=(10, 5))
    with pytest.raises(ValueError, match="trace file not found"):
        MooncakeWorkload(path="/nonexistent/trace.jsonl")
    with pytest.raises(ValueError):
        RandomWorkload(input_len=0)
