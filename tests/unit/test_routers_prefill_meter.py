"""PrefillMeter: a replica's prefill speed as its queue drains (uncached tokens per second of waiting prompts
that had prefill work to do)."""

from __future__ import annotations

import pytest

from routers.prefill_meter import MAX_SPANS, PrefillMeter

pytestmark = pytest.mark.unit


def test_a_prompt_alone_measures_its_tokens_over_its_time_to_first_output():
    m = PrefillMeter(window_s=0.5)
    m.first_output(10.8, 8_000, started_at=10.0)
    assert m.rate == pytest.approx(10_000)


def test_a_queue_measures_its_throughput_not_the_speed_of_its_first_prompt():
    # Four 6K prompts arrive together; the first alone would say 6000 / 0.1 s = 60K/s, but the queue drained
    # 24K tokens in 0.6 s: 40K/s is the speed the router must age this replica's queue with.
    m = PrefillMeter(window_s=0.5)
    for t in (0.1, 0.2, 0.4, 0.6):
        m.first_output(t, 6_000, started_at=0.0)
    assert m.rate == pytest.approx(24_000 / 0.6)


def test_idle_time_between_prompts_does_not_count():
    m = PrefillMeter(window_s=0.5)
    m.first_output(0.3, 3_000, started_at=0.0)  # 0.3 busy seconds: the window is not closed yet
    assert m.rate == 0.0
    m.first_output(5.3, 3_000, started_at=5.0)  # 4.7 idle seconds later
    assert m.rate == pytest.approx(6_000 / 0.6)


def test_cache_hits_waiting_beside_a_miss_do_not_dilute_its_speed():
    # A replica busy with hits (40 uncached tokens each, always one waiting for its first step) and one 6K miss
    # that took 0.15 s: the speed is the miss's 40K/s, not (6000 + hits) over the 2 s the hits kept it busy.
    m = PrefillMeter(window_s=0.1)
    t = 0.0
    for _ in range(100):
        m.first_output(t + 0.02, 40, started_at=t)
        t += 0.02
    m.first_output(1.15, 6_000, started_at=1.0)
    assert m.rate == pytest.approx(6_000 / 0.15)


def test_overlapping_waits_count_their_union_once_and_the_window_is_smoothed():
    m = PrefillMeter(window_s=0.5, alpha=0.5)
    m.first_output(0.3, 3_000, started_at=0.0)
    m.first_output(0.5, 2_000, started_at=0.2)  # overlaps [0.2, 0.3]: the union is [0, 0.5]
    assert m.rate == pytest.approx(10_000)
    m.first_output(1.5, 10_000, started_at=1.0)  # 20K/s in the next window
    assert m.rate == pytest.approx(15_000)  # EWMA with alpha 0.5
    m.first_output(1.6, 4_000, started_at=1.2)  # [1.2, 1.5] was counted in the closed window: only 0.1 s is new
    m.first_output(2.0, 4_000, started_at=1.6)
    assert m.rate == pytest.approx(0.5 * 15_000 + 0.5 * 8_000 / 0.5)


def test_short_prompts_alone_do_not_make_a_rate_and_memory_is_bounded():
    m = PrefillMeter(window_s=0.5, min_prompt_tokens=512)
    for i in range(10):
        m.first_output(i * 1.0 + 0.9, 500, started_at=i * 1.0)  # 0.9 s each, but below min_prompt_tokens
    assert m.rate == 0.0
    for i in range(3 * MAX_SPANS):
        m.first_output(100.0 + i + 0.01, 600, started_at=100.0 + i)
    assert len(m._spans) <= MAX_SPANS
