"""PrefillMeter: a replica's prefill speed as its queue drains (uncached tokens per second of waiting prompts)."""

from __future__ import annotations

import pytest

from routers.prefill_meter import PrefillMeter

pytestmark = pytest.mark.unit


def test_a_prompt_alone_measures_its_tokens_over_its_time_to_first_output():
    m = PrefillMeter(window_s=0.5)
    m.started(10.0)
    m.first_output(10.8, 8_000)
    assert m.rate == pytest.approx(10_000) and m.pending == 0


def test_a_queue_measures_its_throughput_not_the_speed_of_its_first_prompt():
    # Four 6K prompts arrive together; the first alone would say 6000 / 0.1 s = 60K/s, but the queue drained
    # 24K tokens in 0.6 s: 40K/s is the speed the router must age this replica's queue with.
    m = PrefillMeter(window_s=0.5)
    for _ in range(4):
        m.started(0.0)
    for t in (0.1, 0.2, 0.4, 0.6):
        m.first_output(t, 6_000)
    assert m.rate == pytest.approx(24_000 / 0.6)


def test_idle_time_between_prompts_does_not_count():
    m = PrefillMeter(window_s=0.5)
    m.started(0.0)
    m.first_output(0.3, 3_000)  # 0.3 busy seconds: the window is not closed yet
    assert m.rate == 0.0
    m.started(5.0)  # 4.7 idle seconds later
    m.first_output(5.3, 3_000)
    assert m.rate == pytest.approx(6_000 / 0.6)


def test_a_prompt_that_left_early_counts_its_time_not_its_tokens_and_windows_are_smoothed():
    m = PrefillMeter(window_s=0.5, alpha=0.5)
    m.started(0.0)
    m.started(0.0)
    m.abandoned(0.25)  # cancelled before its first output
    m.first_output(0.5, 5_000)
    assert m.rate == pytest.approx(10_000)
    m.started(1.0)
    m.first_output(1.5, 10_000)  # 20K/s in this window
    assert m.rate == pytest.approx(15_000)  # EWMA with alpha 0.5
    m.abandoned(2.0)  # nothing pending: ignored
    assert m.pending == 0


def test_short_prompts_alone_do_not_make_a_rate():
    m = PrefillMeter(window_s=0.5, min_tokens=256)
    for i in range(10):
        m.started(i * 1.0)
        m.first_output(i * 1.0 + 0.1, 20)  # 200 tokens in 1 busy second: below min_tokens
    assert m.rate == 0.0
