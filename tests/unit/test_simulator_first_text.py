"""The client's TTFT is its first token with text: ``EngineModel.empty_first_share`` and its measure
(``benchmarks.simulator.text_fit.first_text``)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from benchmarks.simulator import workloads
from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.load import Driver, LoadPlan
from benchmarks.simulator.sim import ClusterSpec, simulate
from benchmarks.simulator.text_fit import first_text
from serve_app.config.routing import RoutingConfig

pytestmark = pytest.mark.unit

ENGINE = EngineModel(prefill_tokens_per_s=20_000, step_s=0.005, kv_blocks=1024, block_size=16)


def test_the_share_of_token_id_prompts_is_a_hash_of_the_request_number():
    engine = ENGINE.with_(empty_first_share=0.45)
    picks = [engine.text_from(rid, False, 64) for rid in range(20_000)]
    assert set(picks) == {1, 2} and sum(p == 2 for p in picks) / len(picks) == pytest.approx(0.45, abs=0.01)
    assert picks == [engine.text_from(rid, False, 64) for rid in range(20_000)]  # no random draw
    assert {engine.text_from(rid, True, 64) for rid in range(1000)} == {1}  # chat prompts
    assert {engine.text_from(rid, False, 1) for rid in range(1000)} == {1}  # one token: it is the answer
    assert {ENGINE.text_from(rid, False, 64) for rid in range(1000)} == {1}
    with pytest.raises(ValueError, match="empty_first_share"):
        EngineModel(empty_first_share=1.0)


def _lone(engine: EngineModel, text: bool) -> tuple[float, float]:
    """(TTFT, TPOT) of request 0 alone (its first token has no text under any share > 0)."""
    sessions = [workloads.SimSession("s", [workloads.Turn(256, 8, workloads.chain_keys([(0, b) for b in range(16)]),
                                                          text=text)], arrival_s=0.0)]
    res = simulate(Driver(iter(sessions), LoadPlan("trace")), RoutingConfig(strategy="round-robin").knobs(),
                   ClusterSpec(1, ingresses=1), engine)
    assert res.completed == 1 and len(res.ttft_s) == 1
    return res.ttft_s[0], res.tpot_s[0]


@pytest.mark.parametrize("front", [{}, {"frontend_sharing": "fifo", "frontend_s_per_token": 1e-4},
                                   {"frontend_sharing": "ps", "frontend_s_per_token": 1e-4},
                                   {"frontend_sharing": "loop", "frontend_s_per_token": 1e-4},
                                   {"frontend_sharing": "ps", "client_s_per_token": 1e-4}])
def test_a_first_token_without_text_puts_the_ttft_one_token_later(front):
    engine = ENGINE.with_(**front)
    ttft, tpot = _lone(engine, text=False)
    later, _ = _lone(engine.with_(empty_first_share=0.01), text=False)
    assert later == pytest.approx(ttft + tpot, rel=0.02)  # alone, every token takes one decode step
    assert _lone(engine.with_(empty_first_share=0.01), text=True)[0] == pytest.approx(_lone(engine, text=True)[0])


@pytest.mark.parametrize("sharing", ["ps", "loop"])
def test_every_request_keeps_one_ttft_under_load(sharing):
    engine = ENGINE.with_(frontend_sharing=sharing, frontend_s_per_request=0.001, frontend_s_per_token=1e-4,
                          frontend_merge_busy=0.2, empty_first_share=0.45)
    sessions = workloads.docqa_sessions(docs=4, doc_tokens=(512, 1024), question_tokens=(16, 32), output_len=16,
                                        block_size=16, seed=1)
    res = simulate(Driver(sessions, LoadPlan("concurrency", 16, num_requests=120)),
                   RoutingConfig(strategy="kv-aware").knobs(), ClusterSpec(2, ingresses=2), engine)
    base = simulate(Driver(workloads.docqa_sessions(docs=4, doc_tokens=(512, 1024), question_tokens=(16, 32),
                                                    output_len=16, block_size=16, seed=1),
                           LoadPlan("concurrency", 16, num_requests=120)),
                    RoutingConfig(strategy="kv-aware").knobs(), ClusterSpec(2, ingresses=2),
                    engine.with_(empty_first_share=0.0))
    assert res.completed == res.sent == 120 and len(res.ttft_s) == 120
    assert sum(res.ttft_s) > sum(base.ttft_s)


def _bench(name: str, api: str | None, firsts: list[tuple[float, float]]) -> dict:
    workload = {"name": name, **({"api": api} if api else {})}
    return {"config": {"workload": workload},
            "requests": [{"ok": True, "first_chunk_s": f, "ttft_s": t, "output_tokens": 64} for f, t in firsts]
            + [{"ok": False, "first_chunk_s": None, "ttft_s": None, "output_tokens": 0}]}


def test_the_share_is_measured_on_token_id_workloads_once_per_result(tmp_path):
    docqa = _bench("docqa", "completions", [(0.04, 0.04), (0.04, 0.05), (0.03, 0.03), (0.05, 0.07)])
    chat = _bench("multiturn", None, [(0.05, 0.0501)] * 4)  # the role chunk comes first whatever the token
    (tmp_path / "kv-aware-docqa-sat.json").write_text(json.dumps(docqa))
    archive = tmp_path / "logs.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, doc in (("work/kv-aware-docqa-sat.json", docqa), ("work/kv-aware-multiturn-sat.json", chat)):
            data = json.dumps(doc).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = first_text([str(tmp_path / "kv-aware-docqa-sat.json"), str(archive)])
    assert out["empty_first_share"] == 0.5 and out["requests"] == 4  # the archive's copy counts once, chat never
    assert out["rows"] == [{"cell": "kv-aware-docqa-sat", "workload": "docqa", "requests": 4, "empty_first": 2,
                            "share": 0.5}]
    (tmp_path / "kv-aware-multiturn-sat.json").write_text(json.dumps(chat))
    with pytest.raises(ValueError, match="per-request"):  # no token-id workload among them
        first_text([str(tmp_path / "kv-aware-multiturn-sat.json")])
