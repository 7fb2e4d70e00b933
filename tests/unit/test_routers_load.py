"""LoadTracker: reports aged by prefill speed, merged with the router's own in-flight accounting."""

from __future__ import annotations

import pytest

from routers.load import LoadTracker

pytestmark = pytest.mark.unit

REPORT = {"block_size": 16, "num_gpu_blocks": 500, "num_running": 2, "num_waiting": 1,
          "queued_prefill_tokens": 10_000, "prefill_tokens_per_s": 1_000.0, "kv_usage": 0.5, "timestamp": 100.0}


def test_report_is_aged_by_the_measured_prefill_speed():
    lt = LoadTracker(default_prefill_s_per_token=1e-4)
    s = lt.snapshot("a", REPORT, 64, now=104.0)
    assert (s.queued_prefill_tokens, s.running, s.kv_capacity_blocks, s.block_size) == (6_000, 3, 500, 16)
    assert s.has_stats and s.prefill_tokens_per_s == 1_000.0 and s.max_ongoing == 64
    assert lt.snapshot("a", REPORT, 64, now=200.0).queued_prefill_tokens == 0


def test_own_accounting_covers_what_the_stale_report_misses():
    lt = LoadTracker(default_prefill_s_per_token=1e-4)
    lt.snapshot("a", REPORT, 64, now=100.0)  # learns a's speed: 1000 tokens/s
    for i in range(5):
        lt.on_routed("a", f"q{i}", 4_000, now=100.0)
    s = lt.snapshot("a", REPORT, 64, now=101.0)
    assert s.queued_prefill_tokens == 19_000  # own fluid queue 20k - 1s x 1000 > aged report 9k
    assert s.running == 5
    lt.on_completed("a", "q0")
    lt.on_completed("a", "unknown")
    assert lt.outstanding("a") == 4


def test_no_report_yet_uses_own_counts_only():
    lt = LoadTracker(default_prefill_s_per_token=1e-3)
    lt.on_routed("new", "q", 500, now=0.0)
    s = lt.snapshot("new", {}, 8, now=0.1)
    assert not s.has_stats and s.running == 1 and s.queued_prefill_tokens == 400


def test_outstanding_is_bounded_and_removal_forgets():
    lt = LoadTracker(default_prefill_s_per_token=1e-4, max_outstanding=3)
    for i in range(10):
        lt.on_routed("a", f"q{i}", 1, now=0.0)
    assert lt.outstanding("a") == 3
    lt.remove_replica("a")
    assert lt.outstanding("a") == 0 and lt.snapshot("a", {}, 8, now=1.0).queued_prefill_tokens == 0


def test_snapshot_is_reused_only_while_its_inputs_are_unchanged():
    lt = LoadTracker(default_prefill_s_per_token=1e-4)
    first = lt.snapshot("a", REPORT, 64, now=100.0)
    assert lt.snapshot("a", REPORT, 64, now=100.001) is first
    assert lt.snapshot("a", REPORT, 64, now=100.01) is not first  # older than SNAPSHOT_REUSE_S
    second = lt.snapshot("a", REPORT, 64, now=100.01)
    lt.on_routed("a", "q", 100, now=100.01)
    assert lt.snapshot("a", REPORT, 64, now=100.01) is not second  # own accounting changed
    third = lt.snapshot("a", REPORT, 64, now=100.01)
    assert lt.snapshot("a", dict(REPORT), 64, now=100.01) is not third  # a new report arrived


def test_every_queue_drains_at_the_mean_of_the_measured_speeds():
    # b's last measurement was twice a's: aged at its own speed, b would look emptier with the same queue.
    lt = LoadTracker(default_prefill_s_per_token=1e-4)
    a = lt.snapshot("a", REPORT, 64, now=100.0)
    b = lt.snapshot("b", {**REPORT, "prefill_tokens_per_s": 3_000.0}, 64, now=100.0)
    assert (a.prefill_tokens_per_s, b.prefill_tokens_per_s) == (1_000.0, 3_000.0)  # the policy still sees each
    a = lt.snapshot("a", REPORT, 64, now=102.0)
    b = lt.snapshot("b", {**REPORT, "prefill_tokens_per_s": 3_000.0}, 64, now=102.0)
    assert a.queued_prefill_tokens == b.queued_prefill_tokens == 10_000 - 2 * 2_000  # mean speed 2000 tokens/s
    lt.on_routed("c", "q", 5_000, now=102.0)  # c has not reported: its own queue drains at the mean too
    assert lt.snapshot("c", {}, 64, now=103.0).queued_prefill_tokens == 3_000
    lt.remove_replica("b")
    assert lt.snapshot("a", REPORT, 64, now=104.0).queued_prefill_tokens == 10_000 - 4 * 1_000


def test_a_fixed_speed_ignores_the_replicas_measurements():
    lt = LoadTracker(default_prefill_s_per_token=1e-4, measured_speed=False)  # 10K tokens/s, whatever they report
    a = lt.snapshot("a", REPORT, 64, now=100.5)
    assert a.prefill_tokens_per_s == 0.0  # the policy then prices prefill at the same default
    assert a.queued_prefill_tokens == 10_000 - 5_000  # aged 0.5 s at 10K tokens/s, not at the reported 1K
    lt.on_routed("c", "q", 25_000, now=102.0)
    assert lt.snapshot("c", {}, 64, now=103.0).queued_prefill_tokens == 15_000


def test_cancel_takes_back_a_request_that_never_reached_the_replica():
    lt = LoadTracker(default_prefill_s_per_token=1e-3)  # drains 1000 tokens/s
    lt.on_routed("a", "q0", 500, now=0.0)
    lt.on_routed("a", "q1", 300, now=0.0)
    lt.cancel("a", "q0", now=0.1)  # 800 - 100 drained - 500 taken back
    s = lt.snapshot("a", {}, 8, now=0.1)
    assert (s.running, s.queued_prefill_tokens) == (1, 200)
    lt.cancel("a", "q0", now=0.1)  # twice, or unknown: nothing
    lt.cancel("b", "q1", now=0.1)
    lt.cancel("a", "q1", now=0.5)  # more than is left: the queue stops at zero
    assert lt.outstanding("a") == 0 and lt.snapshot("a", {}, 8, now=0.5).queued_prefill_tokens == 0
