"""The simulator's twin of ``kvserve bench --processes N`` (``benchmarks/simulator/load.py``: ``LoadPlan.split``,
``SplitDriver``): each part gets the share, the session shard and the arrival stream that the bench's process of
that index gets, a split Poisson load sends at exactly the bench processes' arrival times, sends are numbered
across the parts, a closed loop keeps each part's workers on its own sessions, every request completes once, and the
committed H200 run's Poisson cells are sent exactly the requests their GPU run completed."""

from __future__ import annotations

import json
import random
from itertools import takewhile
from pathlib import Path

import pytest

from benchmarks.bench.loadgen import LoadSpec, _poisson
from benchmarks.bench.split import split_load
from benchmarks.simulator import workloads
from benchmarks.simulator.engine import EngineModel
from benchmarks.simulator.load import Driver, LoadPlan, SimSession, SplitDriver, Turn, split_driver
from benchmarks.simulator.routing_cells import gpu_cells, sessions_for
from benchmarks.simulator.sim import ClusterSpec, simulate
from serve_app.config.routing import RoutingConfig

pytestmark = pytest.mark.unit


def _sessions(n: int = 10_000, turns: int = 1):
    return iter([SimSession(str(i), [Turn(64, 4, ()) for _ in range(turns)]) for i in range(n)])


class _Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[float, Turn]] = []

    def __call__(self, now: float, turn: Turn) -> None:
        self.sent.append((now, turn))


@pytest.mark.parametrize("plan", [LoadPlan("concurrency", 10, duration_s=30.0),
                                  LoadPlan("rate", 24.716, duration_s=30.0),
                                  LoadPlan("rate", 6.0, num_requests=7, width=16, seed=5)])
def test_each_part_is_the_bench_process_of_its_index(plan):
    spec = LoadSpec(mode=plan.mode, concurrency=int(plan.level) if plan.mode == "concurrency" else 1,
                    rate=plan.level if plan.mode == "rate" else 1.0, num_requests=plan.num_requests,
                    duration_s=plan.duration_s, width=plan.width, seed=plan.seed)
    parts, bench = plan.split(4), split_load(spec, 4)
    assert [p.shard for p in parts] == [b.shard for b in bench]
    assert [p.arrivals_key for p in parts] == [b.arrivals_key for b in bench]
    assert len({p.arrivals_key for p in parts}) == 4
    assert [p.session_width for p in parts] == [b.session_width for b in bench]
    assert [p.num_requests for p in parts] == [b.num_requests for b in bench]
    if plan.mode == "concurrency":
        assert [p.level for p in parts] == [b.concurrency for b in bench] == [3, 3, 2, 2]
    else:
        assert [p.level for p in parts] == pytest.approx([b.rate for b in bench])
        assert sum(p.level for p in parts) == pytest.approx(plan.level)
    assert plan.arrivals_key == spec.arrivals_key == f"{plan.seed}/arrivals"  # one process: the bench's stream


def test_a_split_poisson_load_sends_at_the_bench_processes_arrival_times():
    plan = LoadPlan("rate", 8.0, duration_s=5.0, seed=3)
    sink = _drive(SplitDriver(_sessions(), plan, 4))
    expected = []
    for spec in split_load(LoadSpec(mode="rate", rate=8.0, duration_s=5.0, seed=3), 4):
        times = _poisson(spec.rate, random.Random(spec.arrivals_key))  # the bench process's own arrivals
        expected += [(at, spec.shard.index) for at in takewhile(lambda at: at < 5.0, times)]
    assert [(now, turn.part) for now, turn in sink.sent] == sorted(expected)
    assert [turn.rid for _, turn in sink.sent] == list(range(len(sink.sent)))  # numbered across parts, in send order
    # each part sends its own shard of the stream: positions k, k+4, ... in order
    for k in range(4):
        keys = [int(turn.session.key) for _, turn in sink.sent if turn.part == k]
        assert keys == list(range(k, 4 * len(keys), 4))


def test_a_split_closed_loop_refills_each_part_from_its_own_workers_and_sessions():
    drv, sink = SplitDriver(_sessions(turns=2), LoadPlan("concurrency", 10, duration_s=30.0), 4), _Sink()
    assert drv.begin(sink) is None
    assert [sum(turn.part == k for _, turn in sink.sent) for k in range(4)] == [3, 3, 2, 2]
    for _, turn in sink.sent:
        assert int(turn.session.key) % 4 == turn.part
    # the workers start one per part in turn, so the first sends are the stream's first sessions, in order
    assert [int(turn.session.key) for _, turn in sink.sent] == list(range(10))
    # a part-2 turn finishes: part 2's freed worker sends the next ready turn of part 2's open sessions (4 of the
    # 16: session 10, whose first turn waited; the finished session's second turn queues behind it), nothing else
    done = next(turn for _, turn in sink.sent if turn.part == 2)
    drv.finish(done, 1.0, sink)
    assert len(sink.sent) == 11
    now, nxt = sink.sent[-1]
    assert (now, nxt.part, nxt.session.key, nxt.rid) == (1.0, 2, "10", 10)


def test_split_driver_keeps_one_driver_for_one_process_or_a_trace():
    assert isinstance(split_driver(_sessions(), LoadPlan("rate", 5.0, duration_s=1.0), 1), Driver)
    assert isinstance(split_driver(_sessions(), LoadPlan("trace"), 4), Driver)
    assert isinstance(split_driver(_sessions(), LoadPlan("rate", 5.0, duration_s=1.0), 4), SplitDriver)
    with pytest.raises(ValueError, match="concurrency or rate"):
        SplitDriver(_sessions(), LoadPlan("trace"), 4)


@pytest.mark.parametrize("plan", [LoadPlan("concurrency", 16, duration_s=4.0), LoadPlan("rate", 20.0, duration_s=4.0)])
def test_every_request_of_a_split_load_completes_once_on_its_parts_client_cores(plan):
    engine = EngineModel(prefill_tokens_per_s=20_000, step_s=0.005, kv_blocks=1024, block_size=16, client_cores=4,
                         client_s_per_request=0.001, client_s_per_token=0.0002)
    sessions = workloads.multiturn_sessions(sessions=32, turns=4, system_words=256, output_len=16, block_size=16)
    drv = SplitDriver(sessions, plan, 4)
    out = simulate(drv, RoutingConfig(strategy="kv-aware").knobs(), ClusterSpec(2), engine).summary(per_replica=False)
    assert out["requests"] == out["sent"] == drv.sent == sum(p.sent for p in drv.parts) > 0


def test_the_committed_h200_open_loop_cells_replay_the_gpu_runs_request_counts():
    """Each Poisson cell of ``routing_h200.json`` replayed as its 4 bench processes sends exactly the requests the GPU
    run completed (no errors there); one stream at the whole rate sends another number (r25: 168 against 207)."""
    doc = json.loads(Path("benchmarks/results/routing_h200.json").read_text())
    cells = [c for c in gpu_cells(doc) if c.mode == "rate"]
    assert len(cells) == 6
    for cell in cells:
        plan = LoadPlan(cell.mode, cell.level, duration_s=cell.duration_s, seed=cell.bench_seed, width=16)

        def sessions(cell=cell):
            return sessions_for(cell.workload, doc["scale_settings"]["workloads"][cell.workload], 16, cell.prompt_seed)

        split = len(_drive(split_driver(sessions(), plan, cell.client_processes)).sent)
        assert (cell.measured["errors"], split) == (0, cell.measured["completed"]), (cell.name, cell.load)
        assert len(_drive(Driver(sessions(), plan)).sent) != split


def _drive(drv) -> _Sink:
    """Every send of an open-loop driver (its arrivals do not wait for completions)."""
    sink = _Sink()
    t = drv.begin(sink)
    while t is not None:
        t = drv.tick(t, sink)
    return sink
