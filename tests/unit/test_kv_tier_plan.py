"""KV tier store admission and dedupe arithmetic (pure), and the page-interior rule of loads."""

from __future__ import annotations

import pytest

from deployments.kv_tier.plan import admit_stores, skip_present

pytestmark = pytest.mark.unit


def test_idle_step_admits_everything():
    cands = [("a", 0, 16), ("a", 16, 32), ("b", 0, 5)]
    assert admit_stores(cands, busy=False, budget_blocks=0) == (cands, {})


def test_busy_step_admits_lowest_blocks_first_and_says_where_cut_requests_resume():
    cands = [("a", 16, 32), ("a", 0, 16), ("b", 0, 16), ("c", 32, 40)]
    out, resume = admit_stores(cands, busy=True, budget_blocks=20)
    assert out == [("a", 0, 16), ("b", 0, 4)]
    assert resume == {"a": 16, "b": 4, "c": 32}  # a lost 16..32, b was cut at 4, c got nothing


def test_busy_step_with_zero_budget_stores_nothing():
    out, resume = admit_stores([("a", 0, 4)], busy=True, budget_blocks=0)
    assert out == [] and resume == {"a": 0}


def test_skip_present_skips_only_leading_blocks_the_tier_holds():
    assert skip_present(0, 5, [True, True, False, True]) == 2
    assert skip_present(0, 3, [True, True, True, True]) == 3  # empty range: nothing to store
    assert skip_present(2, 6, []) == 2


def test_page_interior_registers_whole_pages_only():
    from deployments.kv_tier.host_memory import page_interior

    page = 4096
    assert page_interior(3 * page + 64, 10 * page, page) == (page - 64, 10 * page - 64)
    assert page_interior(page, 2 * page, page) == (0, 2 * page)
    assert page_interior(100, 200, page) == (0, 0)
    lo, hi = page_interior(12345, 1 << 22, page)
    assert (12345 + lo) % page == 0 and (12345 + hi) % page == 0 and 0 <= lo < page and hi <= 1 << 22


def test_copy_runs_groups_consecutive_pairs():
    from deployments.kv_tier.plan import copy_runs

    assert copy_runs([0, 1, 2, 3], [7, 8, 9, 3]) == [(0, 7, 3), (3, 3, 1)]
    assert copy_runs([], []) == []
    assert copy_runs([2, 3], [5, 4]) == [(2, 5, 1), (3, 4, 1)]


@pytest.mark.parametrize("dst", [[5, 6, 7, 8], [9, 10, 2, 3], [8, 6, 4, 2, 0]])
def test_scatter_runs_matches_index_copy(dst):
    torch = pytest.importorskip("torch")
    pages = pytest.importorskip("deployments.kv_tier.pages")
    n = len(dst)
    src = list(range(n))
    layers_a = [torch.zeros(12, 8, dtype=torch.uint8) for _ in range(3)]
    layers_b = [t.clone() for t in layers_a]
    dev = torch.randint(0, 255, (3, n, 8), dtype=torch.uint8)
    done = pages.scatter_runs(layers_a, dev, src, dst)
    assert done == (len(pages.copy_runs(src, dst)) <= pages.MAX_FOREACH_RUNS)
    if not done:
        return
    for l, layer in enumerate(layers_b):
        layer.index_copy_(0, torch.tensor(dst), dev[l])
    assert all(torch.equal(a, b) for a, b in zip(layers_a, layers_b))


def test_scatter_many_copies_every_qualifying_chunk_in_one_call_and_leaves_the_rest(monkeypatch):
    torch = pytest.importorskip("torch")
    pages = pytest.importorskip("deployments.kv_tier.pages")
    layers = [torch.zeros(32, 8, dtype=torch.uint8) for _ in range(3)]
    expect = [t.clone() for t in layers]
    chunks = []
    for dst in ([0, 1, 2, 3], [20, 18, 16, 14, 12, 10], [8, 9, 24, 25]):  # the middle one has 6 runs
        chunks.append((torch.randint(0, 255, (3, len(dst), 8), dtype=torch.uint8), list(range(len(dst))), dst))
    calls = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda d, s, **kw: (calls.append(len(d)), real(d, s, **kw)))
    assert pages.scatter_many(layers, chunks) == [True, False, True]
    assert calls == [3 * 1 + 3 * 2]  # one call: 3 layers x (1 run + 2 runs)
    for dev, src, dst in (chunks[0], chunks[2]):
        for l, layer in enumerate(expect):
            layer.index_copy_(0, torch.tensor(dst), dev[l])
    assert all(torch.equal(a, b) for a, b in zip(layers, expect))
