"""On a busy engine the KV tier stores a long prompt in full, a budget's worth per step.

Drives ``TierScheduler.build_connector_meta`` with plain scheduler outputs (no engine, no cluster): three
requests are scheduled every step, so every step is busy and admits ``store_busy_mib_per_step``; the
blocks a step cuts must come back in the request's later (decode) steps, lowest first and unbroken.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deployments.kv_tier import scheduler as sched
from deployments.kv_tier.context import TierContext
from deployments.kv_tier.keys import FINGERPRINT_BYTES
from serve_app.config.kv_tier import KVTierConfig

pytestmark = pytest.mark.unit

BS, BLOCK_BYTES, PROMPT_BLOCKS = 2, 1024**2, 40  # 2-token blocks of 1 MiB; a 40-block prompt


@pytest.fixture
def ts(monkeypatch):
    monkeypatch.setattr(sched, "ray", SimpleNamespace(wait=lambda refs, timeout=0: ([], refs), get=lambda f: f))
    cfg = KVTierConfig(enabled=True, emit_kv_events=False, store_busy_requests=2, store_busy_mib_per_step=8,
                       min_store_blocks=1)
    directory = SimpleNamespace(poll_evicted=SimpleNamespace(remote=lambda owner: None))
    ctx = TierContext(cfg=cfg, model="m", tags={"model": "m"}, owner="engine-0", bs=BS, enabled=True,
                      fp_digest=b"f" * FINGERPRINT_BYTES, dir=directory)
    ctx.block_bytes, ctx.chunk_blocks = BLOCK_BYTES, 16
    return sched.TierScheduler(ctx)


def _request(rid: str, n_blocks: int) -> SimpleNamespace:
    n_tokens = n_blocks * BS + 1
    return SimpleNamespace(request_id=rid, num_tokens=n_tokens, num_prompt_tokens=n_tokens,
                           block_hashes=[bytes([i % 256, i // 256]) * 4 for i in range(n_blocks)])


def _blocks(first: int, n: int) -> SimpleNamespace:
    return SimpleNamespace(get_block_ids=lambda: ([first + i for i in range(n)],))


def _output(new: list, cached_ids: list[str], computed: dict[str, int], n_sched: dict[str, int]):
    cached = SimpleNamespace(req_ids=cached_ids, new_block_ids=[None] * len(cached_ids), resumed_req_ids=set(),
                             num_computed_tokens=[computed[r] for r in cached_ids])
    return SimpleNamespace(scheduled_new_reqs=new, scheduled_cached_reqs=cached, num_scheduled_tokens=n_sched,
                           preempted_req_ids=set())


def test_a_busy_engine_stores_a_long_prompt_in_full_over_its_decode_steps(ts):
    reqs = {rid: _request(rid, PROMPT_BLOCKS) for rid in ("a", "b", "c")}
    for i, (rid, req) in enumerate(reqs.items()):
        ts.update_state_after_alloc(req, _blocks(1000 * i, PROMPT_BLOCKS + 1), 0)
    prompt = PROMPT_BLOCKS * BS + 1
    new = [SimpleNamespace(req_id=rid, block_ids=(list(range(1000 * i, 1000 * i + PROMPT_BLOCKS + 1)),),
                           num_computed_tokens=0) for i, rid in enumerate(reqs)]
    stored: dict[str, list[int]] = {rid: [] for rid in reqs}
    per_step = []
    meta = ts.build_connector_meta(_output(new, [], {}, {rid: prompt for rid in reqs}))  # the whole prefill
    for _ in range(30):  # decode steps: one token each
        per_step.append(sum(len(op.block_ids) for op in meta.stores))
        for op in meta.stores:
            stored[op.req_id] += [b % 1000 for b in op.block_ids]
        computed = {rid: prompt + len(per_step) for rid in reqs}
        meta = ts.build_connector_meta(_output([], list(reqs), computed, {rid: 1 for rid in reqs}))
    assert max(per_step) <= 8  # 8 MiB of 1 MiB blocks per busy step
    for rid in reqs:
        assert stored[rid] == list(range(PROMPT_BLOCKS)), rid  # every prompt block, once, in order
