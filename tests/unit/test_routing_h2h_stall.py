"""A cell that does not end: the bench cut at its limit with its whole process group, the stacks read from py-spy's
dump, the cut recorded in the cell and its system stopped before its later cells."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.routing_h2h import run, stall

DUMP = """Process 4242: VLLM::EngineCore
Python v3.12.3 (/usr/bin/python3.12)

Thread 4242 (idle): "MainThread"
    wait (threading.py:355)
    get (queue.py:180)
    run_busy_loop (vllm/v1/engine/core.py:870)
    run_engine_core (vllm/v1/engine/core.py:820)
    _run (multiprocessing/process.py:108)
Thread 4250 (active): "Thread-3 (process_output_sockets)"
    send (zmq/sugar/socket.py:700)
"""


def test_threads_of_keeps_each_threads_innermost_frames() -> None:
    threads = stall.threads_of(DUMP, frames=2)
    assert [t["thread"] for t in threads] == ['Thread 4242 (idle): "MainThread"',
                                              'Thread 4250 (active): "Thread-3 (process_output_sockets)"']
    assert threads[0]["frames"] == ["wait (threading.py:355)", "get (queue.py:180)"]
    assert threads[1]["frames"] == ["send (zmq/sugar/socket.py:700)"]
    assert stall.threads_of("no py-spy output here") == []


def test_a_command_that_ends_in_time_is_not_cut(tmp_path: Path) -> None:
    rc, cut = stall.run_bounded([sys.executable, "-c", "raise SystemExit(3)"], tmp_path, 30,
                                on_cut=lambda group: pytest.fail("not cut"))
    assert (rc, cut) == (3, None)


def test_a_command_past_its_limit_is_looked_at_then_killed_with_its_children(tmp_path: Path) -> None:
    child_pid = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)']); open({str(child_pid)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    seen = []

    def look(group: int) -> dict:
        seen.append(int(child_pid.read_text()))  # the command and its child still run while it is looked at
        os.kill(seen[0], 0)
        assert os.getpgid(seen[0]) == group  # the child is in the group handed to on_cut
        return {"stacks": "taken"}

    t0 = time.monotonic()
    rc, cut = stall.run_bounded([sys.executable, "-c", script], tmp_path, 2.0, on_cut=look)
    assert rc is None and cut == {"stacks": "taken"} and time.monotonic() - t0 < 20
    for _ in range(50):  # the child, in the command's process group, is gone too (reaped by init)
        try:
            os.kill(seen[0], 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the command's child outlived the cut")


def test_without_py_spy_the_dump_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stall.shutil, "which", lambda name: None)
    assert stall.dump_stacks(tmp_path, "cell") == {"error": "py-spy not installed"}


def test_the_dump_keeps_each_serving_process_stacks_in_a_file(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    reading = SimpleNamespace(procs={4242: ("engine", "EngineCore", 10), 7: ("ray", "raylet", 5),
                                     99: ("client", "bench", 3)})
    monkeypatch.setattr(stall.subprocess, "run", lambda cmd, **kw: SimpleNamespace(
        returncode=0 if cmd[3] == "4242" else 1, stdout=DUMP, stderr="Permission denied"))
    out = stall.dump_stacks(tmp_path, "kv-aware-multiturn-r70", cpu=SimpleNamespace(read=lambda: reading),
                            exe="py-spy")
    client, engine = out["processes"]  # by pid
    assert engine["role"] == "engine" and engine["threads"][0]["frames"][0] == "wait (threading.py:355)"
    assert (tmp_path / engine["file"]).read_text() == DUMP and engine["file"].endswith("-stall-engine-4242.txt")
    assert client == {"pid": 99, "role": "client", "error": "py-spy dump rc 1: Permission denied"}


def test_the_dump_counts_the_bench_group_as_clients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's client processes are untitled multiprocessing children (role "other" by their command line):
    every process of the bench's process group is dumped as a client."""
    reading = SimpleNamespace(procs={5: ("other", "python -c from multiprocessing.spawn ...", 9),
                                     6: ("other", "unrelated", 1)})
    monkeypatch.setattr(stall, "_group_of", lambda pid: 5)  # 5 is the group leader; 6 is asked but also in it here
    monkeypatch.setattr(stall.subprocess, "run", lambda cmd, **kw: SimpleNamespace(returncode=0, stdout=DUMP,
                                                                                    stderr=""))
    out = stall.dump_stacks(tmp_path, "cell", cpu=SimpleNamespace(read=lambda: reading), exe="py-spy", group=5)
    assert [(p["pid"], p["role"]) for p in out["processes"]] == [(5, "client"), (6, "client")]
    monkeypatch.setattr(stall, "_group_of", lambda pid: pid)
    out = stall.dump_stacks(tmp_path, "cell", cpu=SimpleNamespace(read=lambda: reading), exe="py-spy", group=5)
    assert [(p["pid"], p["role"]) for p in out["processes"]] == [(5, "client")]


def test_a_cut_bench_is_an_error_with_its_stacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limits = []
    monkeypatch.setattr(run.stall, "run_bounded", lambda cmd, cwd, limit, on_cut: limits.append(limit) or (
        None, {"processes": []}))
    cell = run.run_bench("http://x/v1", "m", ["--workload", "multiturn"], ["--rate", "38.8"], 30.0,
                         tmp_path / "rr-multiturn-r70.json", "rr")
    assert cell["error"].startswith("cut: the bench was still running 120 s") and limits == [30 + run.CELL_GRACE_S]
    assert cell["cut"] == {"after_s": 120.0, "stacks": {"processes": []}} and "--rate 38.8" in cell["command"]
    monkeypatch.setattr(run.stall, "run_bounded", lambda cmd, cwd, limit, on_cut: limits.append(limit) or (2, None))
    assert run.run_bench("u", "m", [], [], 30.0, tmp_path / "x.json", "rr", timeout_s=45)["error"] == \
        "bench exited with 2"
    assert limits[-1] == 45


def test_a_cut_cell_is_kept_and_its_system_stops_after_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []

    def fake_cell(name, wl, level, *a):
        ran.append((wl, level))
        return {"error": "cut: ...", "cut": {"after_s": 120}} if level == "r70" else {"requests_per_s": 9.0}

    probe = SimpleNamespace(url="u", error=None, start=lambda: None, finish=lambda: {"view_after": {}})
    monkeypatch.setattr(run, "run_cell", fake_cell)
    monkeypatch.setattr(run.evidence, "Probe", lambda *a, **k: probe)
    for name in ("start", "wait_ready", "wait_app_running", "wait_serving", "stop"):
        monkeypatch.setattr(run.serverproc, name, lambda *a, **k: None)
    monkeypatch.setattr(run.time, "sleep", lambda s: None)
    cfg = {"applications": [{"args": {"models": [{"id": "m"}], "routing": {"strategy": "kv-aware"}}}]}
    args = SimpleNamespace(work_dir=str(tmp_path), profile=[], ray_trace=False, fast_path=False, ray_stop=False,
                           git_commit="abc", start_timeout=1, evidence_interval=0, steps=False)
    saved = []
    out = run.run_system("kv-aware", cfg, {"workloads": {"docqa": [], "multiturn": [], "mooncake": []}},
                         [("docqa", "r25"), ("multiturn", "r70"), ("mooncake", "r25")],
                         {}, args, save=lambda new: saved.append(new))
    assert ran == [("docqa", "r25"), ("multiturn", "r70")]  # mooncake's cell not run after the cut
    assert out["multiturn"]["r70"]["cut"] == {"after_s": 120} and out["multiturn"]["r70"]["evidence"]
    assert out["runs"][0]["done"] == ["docqa:r25", "multiturn:r70"]
    assert out["runs"][0]["error"] == "multiturn:r70 cut; the system stopped after it" and len(saved) == 2
    assert run.after_cut(out, [("docqa", "r25"), ("multiturn", "r70"), ("mooncake", "r25")]) == [("mooncake", "r25")]
    assert run.after_cut({"runs": [{"done": ["docqa:r25"]}], "docqa": {"r25": {}}}, [("docqa", "r25")]) == []


def test_the_cells_after_a_cut_run_on_a_fresh_start_of_their_system(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    starts = []
    ok = {"ttft_p50_ms": 1.0, "ttft_p90_ms": 2.0, "ttft_p99_ms": 3.0, "output_tok_per_s": 10.0, "requests_per_s": 1.0,
          "cache_hit_rate": 0.5, "errors": 0, "completed": 30}

    def fake_run_system(name, cfg, scale, cells, doc, args, save):  # the first start's second cell is cut
        starts.append(list(cells))
        run_ = {"cells": [f"{wl}:{lv}" for wl, lv in cells], "done": []}
        out = {"routing": {}, "runs": [run_]}
        for wl, lv in cells:
            cut = len(starts) == 1 and (wl, lv) == ("multiturn", "sat")
            out.setdefault(wl, {})[lv] = {"error": "cut", "cut": {}} if cut else ok
            run_["done"].append(f"{wl}:{lv}")
            save(out)
            if cut:
                break
        return out

    monkeypatch.setattr(run, "run_system", fake_run_system)
    out = tmp_path / "r.json"
    assert run.main(["--config", "configs/gpu-routing.yaml", "--scale", "gpu", "--out", str(out), "--work-dir",
                     str(tmp_path / "w"), "--systems", "round-robin", "--workloads", "docqa,multiturn,no-sharing",
                     "--loads", "sat"]) == 0
    assert starts == [[("docqa", "sat"), ("multiturn", "sat"), ("no-sharing", "sat")], [("no-sharing", "sat")]]
    res = __import__("json").loads(out.read_text())["results"]["round-robin"]
    assert [r["done"] for r in res["runs"]] == [["docqa:sat", "multiturn:sat"], ["no-sharing:sat"]]
    assert "cut" in res["multiturn"]["sat"] and res["docqa"]["sat"] == res["no-sharing"]["sat"] == ok
