"""A replica's own view of its prefix cache: what it served recently is expected cached, nothing else."""

from __future__ import annotations

from deployments.prefix_view import PrefixView
from routers.hashing import block_hashes


def test_served_prefix_counts_as_cached_in_whole_blocks_and_hashes_match_vllms():
    view = PrefixView(block_size=16, num_gpu_blocks=100, algo="sha256", seed="0")
    doc = list(range(100))
    h = view.hashes(doc, (), salt=None)
    assert list(h) == block_hashes(doc, 16, algo="sha256", seed="0")
    assert view.cached_tokens(h) == 0
    view.served(h, now=1.0)
    assert view.cached_tokens(h) == 96  # six full blocks
    other = view.hashes(doc[:40] + [7] * 60, (), salt=None)
    assert view.cached_tokens(other) == 32  # shares two leading blocks
    assert view.cached_tokens(view.hashes(doc, (), salt="tenant-b")) == 0  # another tenant's salt


def test_hashes_given_by_the_ingress_are_used_and_the_view_is_bounded_by_the_kv_cache():
    view = PrefixView(block_size=16, num_gpu_blocks=4, algo="sha256", seed="0")
    assert view.hashes([1] * 64, (11, 12), salt=None) == (11, 12)
    view.served((1, 2, 3, 4), now=1.0)
    view.served((5, 6, 7, 8), now=2.0)  # the cache holds 4 blocks: the first prompt's are gone
    assert view.cached_tokens((1, 2, 3, 4)) == 0
    assert view.cached_tokens((5, 6, 7, 8)) == 64
