"""The head-to-head's py-spy evidence: raw stacks summarized per thread; a missing py-spy is an error, not a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from benchmarks import stack_sampler
from benchmarks.routing_h2h import profile
from benchmarks.routing_h2h.host_cpu import HostCpu, ProcReading
from benchmarks.routing_h2h.profile import CellProfiler, summarize

_LOOP = "thread (11): MainThread;run (asyncio/runners.py:118);_run_once (asyncio/base_events.py:1922)"
RAW = "\n".join([
    (f"{_LOOP};process_outputs (vllm/v1/engine/output_processor.py:656);"
     "_protected_step (vllm/v1/engine/detokenizer.py:226) 60"),
    f"{_LOOP};generate (deployments/vllm_replica.py:140) 20",
    "thread (12): relay;_run (deployments/kv_event_relay.py:119) 20",
    "thread (13): AsyncIO Thread: default;Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982) 25",
])


def test_summarize_shares_per_thread_with_self_and_inclusive_frames() -> None:
    s = summarize(RAW, top=3)
    assert s["samples"] == 125
    main, uvloop, relay = s["threads"]
    assert main["thread"] == "thread (11): MainThread" and main["samples"] == 80 and main["share"] == 0.64
    assert main["top_self"][0] == ["_protected_step (engine/detokenizer.py)", 0.48]  # frames folded across lines
    assert ["_run_once (asyncio/base_events.py)", 0.64] in main["top_inclusive"]
    assert relay["share"] == 0.16 and relay["top_self"] == [["_run (deployments/kv_event_relay.py)", 0.16]]
    # A loop thread inside uvloop's C code (py-spy names the frame Thread.run) counts as such, not as a function.
    assert uvloop["samples"] == 25 and uvloop["opaque_samples"] == 25 and uvloop["top_self"] == []


def test_summarize_without_threads_and_garbage_lines() -> None:
    s = summarize("a (x.py:1);b (x.py:2) 3\nnot a sample line\n\n")
    assert s["samples"] == 3 and s["threads"][0]["thread"] == "all"
    assert summarize("") == {"samples": 0, "threads": []}


class OneProcess(HostCpu):
    """/proc with one serving process of the given role."""

    def __init__(self, pid: int, role: str = "replica") -> None:
        super().__init__()
        self.pid, self.role = pid, role

    def read(self) -> ProcReading:
        return ProcReading(0, 0, {self.pid: (self.role, "python", 0)}, {})


def test_without_py_spy_or_a_sampler_the_error_is_the_cells_profile(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    monkeypatch.setattr(profile.shutil, "which", lambda name: None)
    p = CellProfiler(tmp_path, "kv-aware-docqa-sat", delay_s=0, seconds=1, cpu=OneProcess(os.getpid()))
    p.start()
    assert p.finish() == {"error": "py-spy not installed"}
    p = CellProfiler(tmp_path, "short-cell", delay_s=60, seconds=1)  # the cell ends before the delay: nothing runs
    p.start()
    assert p.finish() == {"error": "the cell ended within the profile's delay (60 s)"}


def test_without_py_spy_the_in_process_sampler_takes_the_samples(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """The stack sampler run.py --profile installs (here: in this process) is turned on for the window."""
    monkeypatch.setattr(profile.shutil, "which", lambda name: None)
    samples = tmp_path / "stacks"
    samples.mkdir()
    threading.Thread(target=stack_sampler._run, args=(samples,), daemon=True).start()
    stop = threading.Event()

    def busy_loop() -> None:  # something for the sampler to see
        while not stop.is_set():
            sum(range(1000))

    threading.Thread(target=busy_loop, daemon=True).start()
    try:
        p = CellProfiler(tmp_path, "cell", delay_s=0, seconds=0.5, cpu=OneProcess(os.getpid(), "ingress"),
                         sample_dir=samples)
        p.start()
        time.sleep(0.8)
        out = p.finish()
    finally:
        stop.set()
    assert out["method"] == "stack_sampler" and out["py_spy"] == "py-spy not installed"
    (proc,) = out["processes"]
    assert proc["pid"] == os.getpid() and proc["role"] == "ingress" and proc["samples"] > 0
    assert any("busy_loop" in f for t in proc["threads"] for f, _ in t["top_inclusive"])
    assert (tmp_path / proc["file"]).is_file() and not (samples / "on").exists()


def test_an_engine_core_is_read_by_py_spy_only_never_handed_to_the_in_process_sampler(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(profile.shutil, "which", lambda name: None)
    assert "engine" in profile.PYSPY_ROLES and "engine" not in profile.ROLES
    samples = tmp_path / "stacks"
    samples.mkdir()
    p = CellProfiler(tmp_path, "cell", delay_s=0, seconds=0.2, cpu=OneProcess(os.getpid(), "engine"),
                     sample_dir=samples)
    p.start()
    assert p.finish() == {"error": "py-spy not installed"}  # vLLM's process has no sampler: nothing waited for
    assert not (samples / "on").exists()


@pytest.mark.skipif(shutil.which("py-spy") is None, reason="py-spy is not installed here")
def test_records_the_serving_processes_it_finds(tmp_path: Path) -> None:
    """A process titled like a Serve replica gets recorded and summarized (where ptrace is allowed)."""
    child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: sum(range(1000))"])
    try:
        p = CellProfiler(tmp_path, "cell", delay_s=0.2, seconds=1, cpu=OneProcess(child.pid))
        p.start()
        time.sleep(1.5)
        out = p.finish()
    finally:
        child.kill()
        child.wait()
    (proc,) = out["processes"]
    assert proc["pid"] == child.pid and proc["role"] == "replica"
    if out["method"] == "py-spy":
        assert proc["rc"] == 0 and proc["samples"] > 0 and (tmp_path / proc["file"]).is_file()
    else:  # no ptrace permission in this sandbox and no sampler given: why is kept, nothing raised
        assert "error" in proc or "error" in out


@pytest.mark.skipif(shutil.which("py-spy") is None, reason="py-spy is not installed here")
def test_idle_samples_a_thread_that_only_waits(tmp_path: Path) -> None:
    """With ``idle`` py-spy also samples a thread blocked in a system call (here: sleeping); without, it skips it."""
    child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
    try:
        outs = {}
        for idle in (False, True):
            p = CellProfiler(tmp_path / str(idle), "cell", delay_s=0.2, seconds=1, cpu=OneProcess(child.pid),
                             idle=idle)
            (tmp_path / str(idle)).mkdir()
            p.start()
            time.sleep(1.5)
            outs[idle] = p.finish()
    finally:
        child.kill()
        child.wait()
    if outs[True].get("method") != "py-spy":
        pytest.skip(f"py-spy cannot attach here: {outs[True]}")
    assert outs[True]["idle"] is True and outs[False]["idle"] is False
    (waiting,) = outs[True]["processes"]
    frames = [f for f, _ in waiting["threads"][0]["top_inclusive"]]
    assert waiting["samples"] > 0 and any("<module>" in f for f in frames), frames
    (skipped,) = outs[False]["processes"]
    assert skipped.get("samples", 0) < waiting["samples"]


def test_profile_idle_needs_cells_to_profile(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from benchmarks.routing_h2h import run

    with pytest.raises(SystemExit):
        run.main(["--out", str(tmp_path / "r.json"), "--profile-idle"])
    assert "--profile-idle changes what --profile records" in capsys.readouterr().err


def test_run_system_profiles_only_the_cells_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run.py --profile docqa:sat``: that cell's evidence carries the profile, the other cell's does not."""
    from benchmarks.routing_h2h import run

    class FakeProbe:
        url, error = "http://x/metrics", None

        def __init__(self, *a, **k) -> None: ...

        def start(self) -> None: ...

        def finish(self) -> dict:
            return {"requests_by_replica": {}}

    class FakeProfiler:
        made: ClassVar[list[str]] = []

        def __init__(self, out_dir: Path, label: str, seconds: float, sample_dir: Path, idle: bool) -> None:
            self.made.append(label)
            self.seconds = seconds
            assert idle is True  # --profile-idle reaches the profiler
            assert sample_dir == tmp_path / "stacks" and sample_dir.is_dir()

        def start(self) -> None: ...

        def finish(self) -> dict:
            return {"seconds": self.seconds, "processes": []}

    for name, fn in {"start": lambda *a: None, "wait_ready": lambda *a: None, "wait_app_running": lambda *a: {},
                     "wait_serving": lambda *a: None,
                     "stop": lambda *a: None, "deployment_name": lambda m: f"vllm-{m}"}.items():
        monkeypatch.setattr(run.serverproc, name, fn)
    monkeypatch.setattr(run.evidence, "Probe", FakeProbe)
    monkeypatch.setattr(run.profile, "CellProfiler", FakeProfiler)
    monkeypatch.setattr(run, "run_cell", lambda *a: {"ttft_p50_ms": 1.0})
    monkeypatch.setattr(run.time, "sleep", lambda s: None)
    args = run.parser().parse_args(["--out", str(tmp_path / "r.json"), "--work-dir", str(tmp_path),
                                    "--profile", "docqa:sat", "--profile-seconds", "7", "--profile-idle"])
    base = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/cpu.yaml").read_text())
    cfg = run.system_config(base, "kv-aware", run.SCALES["cpu"]["engine_kwargs"])
    out = run.run_system("kv-aware", cfg, run.SCALES["cpu"], [("docqa", "sat"), ("multiturn", "sat")],
                         {"calibration": {}}, args)
    assert out["docqa"]["sat"]["evidence"]["profile"] == {"seconds": 7.0, "processes": []}
    assert "profile" not in out["multiturn"]["sat"]["evidence"]
    assert FakeProfiler.made == ["kv-aware-docqa-sat"]
    served = yaml.safe_load((tmp_path / "kv-aware.yaml").read_text())["applications"][0]["args"]
    sampler_env = {**stack_sampler.HOOK_ENV, "KVSERVE_STACK_SAMPLE_DIR": str(tmp_path / "stacks")}
    assert served["models"][0]["env"].items() >= sampler_env.items()  # the sampler, idle until turned on
    assert served["ingress"]["deployment"]["ray_actor_options"]["runtime_env"]["env_vars"].items() >= \
        sampler_env.items()
