"""Per-tenant limits of one ingress replica (deployments.rate_limits): buckets, shares, resizing; ``now`` passed in."""

from __future__ import annotations

import pytest

from deployments.rate_limits import TenantLimits, TokenBucket

pytestmark = pytest.mark.unit


def test_token_bucket_never_holds_more_than_a_minute():
    b = TokenBucket(60, now=0)
    b.charge(60, now=0)
    assert b.wait_s(1, now=0) == pytest.approx(1.0)
    assert b.wait_s(60, now=3600) == 0 and b.level == 60


def test_resizing_refills_at_the_old_rate_then_cuts_the_level_and_keeps_a_debt():
    b = TokenBucket(60, now=0)
    b.charge(50, now=0)  # level 10
    b.resize(20, now=5)  # +5 at 1/s = 15, then capped at 20: 15
    assert (b.capacity, b.rate, b.level) == (20, pytest.approx(20 / 60), 15)
    b.resize(10, now=5)
    assert b.level == 10
    b.charge(30, now=5)  # 20 in debt
    b.resize(120, now=5)
    assert b.level == -20 and b.wait_s(1, now=5) == pytest.approx(21 / 2)  # 2 per second now


def test_shares_add_up_to_the_limit_across_replicas():
    limits = [TenantLimits(share=4) for _ in range(4)]  # 4 ingress replicas, 40 requests/min for acme
    admitted = sum(1 for lim in limits for _ in range(100) if lim.take_request("acme", 40, now=0) == 0)
    assert admitted == 40
    # A minute later each replica has refilled its 10; one replica alone cannot take more than its share.
    assert sum(1 for _ in range(100) if limits[0].take_request("acme", 40, now=60) == 0) == 10
    assert limits[0].take_request("acme", 40, now=60) == pytest.approx(6.0)  # 10/min: one per 6 s


def test_a_new_share_resizes_every_tenants_buckets():
    lim = TenantLimits(share=1)
    assert lim.take_request("acme", 60, now=0) == 0  # 59 left of 60
    assert lim.take_tokens("acme", 600, 100, now=0) == 0  # 500 left of 600
    assert lim.set_share(2, now=0) and not lim.set_share(2, now=0) and lim.share == 2
    assert lim._requests["acme"].capacity == 30 and lim._requests["acme"].level == 30
    assert lim._tokens["acme"].capacity == 300 and lim._tokens["acme"].level == 300
    assert lim.set_share(0, now=0) and lim.share == 1  # never below one replica
    assert lim._requests["acme"].capacity == 60 and lim._requests["acme"].level == 30  # refills at 1/s from here
    assert lim.take_request("beta", 60, now=0) == 0 and lim._requests["beta"].capacity == 60


def test_tokens_admit_on_any_credit_and_settle_into_debt():
    lim = TenantLimits(share=2)  # 600 tokens/min: 300 here, 5 per second
    assert lim.take_tokens("acme", 600, 280, now=0) == 0
    assert lim.take_tokens("acme", 600, 100, now=0) == 0  # 20 of credit admits a larger request
    lim.settle_tokens("acme", 600, 20, now=0)  # 100 in debt
    assert lim.take_tokens("acme", 600, 1, now=0) == pytest.approx(101 / 5)
    assert lim.take_tokens("acme", 600, 1, now=20.2) == 0
