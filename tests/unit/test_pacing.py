"""Chunk pacing of a replica's streams: every engine step while the loop keeps up, merged while it lags."""

from __future__ import annotations

import asyncio
import itertools
import time

from deployments.pacing import LoopLag, StreamPacer


def _steps(pacer: StreamPacer, times: list[float]) -> list[bool]:
    return [pacer.due(t, finished=(i == len(times) - 1)) for i, t in enumerate(times)]


def test_a_loop_that_keeps_up_sends_every_step():
    lag = LoopLag(threshold_s=0.005)
    for _ in range(50):
        lag.observe(0.0004)
    assert not lag.behind
    assert _steps(StreamPacer(lag, 0.02), [i * 0.008 for i in range(10)]) == [True] * 10


def test_a_lagging_loop_merges_steps_into_one_chunk_per_interval_first_and_last_at_once():
    lag = LoopLag(threshold_s=0.005)
    for _ in range(50):
        lag.observe(0.012)
    assert lag.behind
    sent = _steps(StreamPacer(lag, 0.02), [i * 0.008 for i in range(10)])  # steps at 0, 8, 16, ... 72 ms
    assert sent[0] and sent[-1]
    # in between: one chunk per 20 ms at most (0, 24, 48 ms), plus the last (72 ms)
    assert [i for i, s in enumerate(sent) if s] == [0, 3, 6, 9]


def test_a_stream_asked_to_merge_merges_while_the_replica_keeps_up():
    lag = LoopLag(threshold_s=0.005)
    for _ in range(50):
        lag.observe(0.0004)
    assert not lag.behind
    sent = _steps(StreamPacer(lag, 0.02, merge=True), [i * 0.008 for i in range(10)])
    assert [i for i, s in enumerate(sent) if s] == [0, 3, 6, 9]


def test_hysteresis_merging_stops_only_below_half_the_threshold():
    lag = LoopLag(threshold_s=0.010, alpha=1.0)
    lag.observe(0.011)
    assert lag.behind
    lag.observe(0.007)  # below the threshold, above half: still behind
    assert lag.behind
    lag.observe(0.004)
    assert not lag.behind
    lag.observe(0.009)  # back up, but not over the threshold: not behind
    assert not lag.behind


def test_a_busy_loop_is_behind_until_well_under_its_busy_threshold():
    lag = LoopLag(threshold_s=0.005, period_s=0.05, busy_threshold=0.5, busy_window_s=0.05)  # no smoothing
    lag.observe(0.0, busy=0.45)
    assert not lag.behind
    lag.observe(0.0, busy=0.55)
    assert lag.behind  # on time, but busy: new streams merge
    lag.observe(0.0, busy=0.35)
    assert lag.behind  # merging made it less busy; still above 0.6 of the threshold
    lag.observe(0.0, busy=0.25)
    assert not lag.behind


def test_the_busy_share_is_smoothed_over_its_window():
    lag = LoopLag(threshold_s=0.0, period_s=0.1, busy_threshold=0.5, busy_window_s=1.0)
    lag.observe(0.0, busy=1.0)  # one busy tenth of a second is not a busy loop
    assert lag.busy == 0.1 and not lag.behind
    for _ in range(30):
        lag.observe(0.0, busy=0.8)
    assert 0.75 < lag.busy < 0.8 and lag.behind


def test_the_probe_measures_its_threads_cpu_share():
    async def scenario() -> tuple[float, float]:
        lag = LoopLag(threshold_s=0.0, period_s=0.01, busy_window_s=0.01)  # each probe's own window
        task = asyncio.get_running_loop().create_task(lag.run())
        end = time.perf_counter() + 0.2
        while time.perf_counter() < end:
            time.sleep(0.008)  # noqa: ASYNC251 - off the CPU while holding the loop: late, but not busy
            await asyncio.sleep(0)
        idle = lag.busy
        end = time.perf_counter() + 0.2
        while time.perf_counter() < end:  # on the CPU, yielding to the probe between spins
            spin = time.perf_counter() + 0.008
            while time.perf_counter() < spin:
                pass
            await asyncio.sleep(0)
        task.cancel()
        return idle, lag.busy

    idle, busy = asyncio.run(scenario())
    assert idle < 0.3 and busy > 0.5  # spinning is ~0.9 on an idle machine; a loaded one preempts the thread


def test_threshold_zero_never_merges():
    lag = LoopLag(threshold_s=0.0)
    for _ in range(10):
        lag.observe(1.0)
    assert not lag.behind
    assert all(_steps(StreamPacer(lag, 0.02), [i * 0.001 for i in range(5)]))


def test_the_probe_sees_a_blocked_loop():
    async def scenario() -> tuple[bool, bool]:
        lag = LoopLag(threshold_s=0.005, period_s=0.005, alpha=0.5)
        task = asyncio.get_running_loop().create_task(lag.run())
        await asyncio.sleep(0.05)
        idle = lag.behind
        time.sleep(0.04)  # noqa: ASYNC251 - the loop is held on purpose: the probe's timer fires ~35 ms late
        for _ in range(3):
            await asyncio.sleep(0)
        held = lag.behind
        task.cancel()
        return idle, held

    idle, held = asyncio.run(scenario())
    assert not idle and held


def test_the_probe_reports_its_lag_about_every_period():
    async def scenario() -> list[tuple[float, float]]:
        seen: list[tuple[float, float]] = []
        lag = LoopLag(threshold_s=0.0, period_s=0.002, alpha=1.0)
        task = asyncio.get_running_loop().create_task(
            lag.run(lambda probe: seen.append((time.perf_counter(), probe.lag_s)), report_every_s=0.02))
        await asyncio.sleep(0.03)
        time.sleep(0.03)  # noqa: ASYNC251 - the loop is held on purpose: the next report carries the lateness
        await asyncio.sleep(0.03)
        task.cancel()
        return seen

    seen = asyncio.run(scenario())
    assert len(seen) >= 2
    assert all(b[0] - a[0] >= 0.019 for a, b in itertools.pairwise(seen))  # no more often than report_every_s
    assert max(lag for _, lag in seen) >= 0.02  # the held loop's lateness was reported
