"""The KV tier scheduler's router events: OBJ events name the directory epoch its eviction poll reported.

Runs ``TierScheduler`` over a fake directory whose calls answer at once (``ray.wait``/``ray.get`` patched),
so the poll -> epoch -> medium path is checked without a cluster or an engine.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deployments.kv_tier import scheduler as sched
from deployments.kv_tier.context import TierContext
from deployments.kv_tier.keys import FINGERPRINT_BYTES
from serve_app.config.kv_tier import KVTierConfig

pytestmark = pytest.mark.unit

FP = b"f" * FINGERPRINT_BYTES


class FakeDirectory:
    """Answers ``poll_evicted`` with (epoch, keys) directly (the patched ``ray.get`` returns it as is)."""

    def __init__(self) -> None:
        self.epoch, self.evicted = 1000, []
        self.poll_evicted = SimpleNamespace(remote=lambda owner: (self.epoch, self.take()))

    def take(self) -> list[bytes]:
        out, self.evicted = self.evicted, []
        return out


@pytest.fixture
def tier(monkeypatch):
    monkeypatch.setattr(sched, "ray", SimpleNamespace(wait=lambda refs, timeout=0: (refs, []), get=lambda f: f))
    clock = [100.0]
    monkeypatch.setattr(sched.time, "monotonic", lambda: clock[0])
    directory = FakeDirectory()
    ctx = TierContext(cfg=KVTierConfig(enabled=True), model="m", tags={"model": "m"}, owner="engine-0", bs=2,
                      enabled=True, fp_digest=FP, dir=directory)
    return sched.TierScheduler(ctx), directory, clock


def _stored(ts: sched.TierScheduler):
    req = SimpleNamespace(all_token_ids=[1, 2, 3, 4], lora_request=None)
    return ts._stored_event(req, [b"\x01" * 8, b"\x02" * 8], 0, 2)


def test_obj_events_carry_the_epoch_of_the_last_poll_and_follow_a_restart(tier):
    ts, directory, clock = tier
    assert _stored(ts).medium == "OBJ"  # nothing polled yet: no epoch claimed
    assert ts.take_events() == []  # the first step sends the poll...
    assert ts.take_events() == [] and _stored(ts).medium == "OBJ@1000"  # ...and the next reads it
    directory.epoch, directory.evicted = 2000, [FP + (0).to_bytes(2, "big") + b"\x03" * 8]  # restarted, evicted
    clock[0] += sched._EVICTION_POLL_S + 0.1
    ts.take_events()  # sends the poll
    (removed,) = ts.take_events()
    assert removed.medium == "OBJ@2000" and len(removed.block_hashes) == 1
    assert _stored(ts).medium == "OBJ@2000"
