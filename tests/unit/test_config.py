"""Config validation: the shipped files load, and bad input fails before anything starts, naming the field."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from serve_app.cli import main
from serve_app.config import ConfigError, load_app_config, load_serve_config

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]

MODEL = {"id": "m", "path": "p", "deployment": {"num_replicas": 1, "max_ongoing_requests": 8}}


@pytest.mark.parametrize("name", ["cpu.yaml", "gpu.yaml", "gpu-tp2.yaml", "gpu-routing.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    doc, apps = load_serve_config(ROOT / "configs" / name)
    assert doc["applications"][0]["import_path"] == "serve_app.builder:build_app"
    assert apps[0].models and all(m.deployment.max_ongoing_requests > 5 for m in apps[0].models)


@pytest.mark.parametrize("args, where", [
    ({"models": []}, "models"),
    ({"models": [MODEL], "bogus": 1}, "bogus"),
    ({"models": [{**MODEL, "dtype": "fp7"}]}, "models.0.dtype"),
    ({"models": [{**MODEL, "tensor_parallel_size": 0}]}, "models.0.tensor_parallel_size"),
    ({"models": [{**MODEL, "engine_kwargs": {"tensor_parallel_size": 2}}]}, "models.0.engine_kwargs"),
    ({"models": [{**MODEL, "deployment": {"num_replicas": 1}}]}, "models.0.deployment.max_ongoing_requests"),
    ({"models": [{**MODEL, "deployment": {"max_ongoing_requests": 8, "autoscaling_config": {"max_replicas": 2}}}]},
     "models.0.deployment.autoscaling_config"),
    ({"models": [{**MODEL, "deployment": {"max_ongoing_requests": 8, "num_replicas": 2,
                                         "autoscaling_config": {"target_ongoing_requests": 2}}}]},
     "models.0.deployment"),
    ({"models": [MODEL, MODEL]}, "duplicate model id"),
    ({"models": [MODEL], "routing": {"strategy": "random"}}, "routing.strategy"),
])
def test_invalid_config_names_the_field(args: dict, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_app_config(args, where="applications.0.args.")
    assert where in str(e.value)


def test_autoscaling_is_checked_by_serve(tmp_path: Path) -> None:
    bad = {**MODEL, "deployment": {"max_ongoing_requests": 8, "autoscaling_config": {
        "min_replicas": 3, "max_replicas": 2, "target_ongoing_requests": 2}}}
    with pytest.raises(ConfigError, match="autoscaling_config"):
        load_app_config({"models": [bad]})


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(ROOT / "configs/cpu.yaml")]) == 0
    f = tmp_path / "bad.yaml"
    f.write_text("applications:\n  - import_path: serve_app.builder:build_app\n    args:\n      models: [{id: m}]\n")
    assert main(["check-config", str(f)]) == 2
    err = capsys.readouterr().err
    assert "applications.0.args.models.0.path: Field required" in err
    f.write_text("not: [a serve config")
    assert main(["check-config", str(f)]) == 2


def test_relative_paths_resolve_under_model_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVSERVE_MODEL_DIR", str(tmp_path))
    cfg = load_app_config({"models": [MODEL]})
    assert cfg.models[0].resolved_path() == tmp_path / "p"
    assert cfg.models[0].resolved_tokenizer() == tmp_path / "p"


def test_start_watchdog_kills_a_hung_start() -> None:
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import subprocess, sys, time
        from deployments.engine import start_watchdog
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
        start_watchdog(0.5, "test engine")
        time.sleep(120)  # a hung start: without the watchdog this process would exit 0 after 120 s
    """)
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=100,
                          cwd=ROOT)
    assert proc.returncode == 1
    child_pid = int(proc.stdout.split()[0])
    import psutil

    def gone() -> bool:
        try:
            return psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 10  # on a loaded machine the orphaned child is reaped a little later
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone()


def test_kv_events_follow_the_strategy_unless_asked_for() -> None:
    from serve_app.config.routing import RoutingConfig

    assert RoutingConfig().strategy == "kv-aware" and RoutingConfig().publishes_kv_events()
    assert not RoutingConfig(strategy="prefix-aware").publishes_kv_events()
    assert RoutingConfig(strategy="round-robin", kv_events=True).publishes_kv_events()  # costed, not read
    with pytest.raises(ValueError, match="kv_events is false but strategy kv-aware"):
        RoutingConfig(strategy="kv-aware", kv_events=False)


def test_routing_prefill_speed_is_measured_by_default_and_fixed_on_request() -> None:
    from serve_app.config.routing import RoutingConfig

    assert RoutingConfig().prefill_speed == "measured"
    assert RoutingConfig(prefill_speed="fixed", prefill_s_per_token=2.5e-5).prefill_speed == "fixed"
    with pytest.raises(ValueError, match="prefill_speed"):
        RoutingConfig(prefill_speed="guessed")


def test_the_knobs_carry_the_prefill_speed_choice_to_every_load_tracker() -> None:
    from serve_app.config.routing import RoutingConfig

    assert RoutingConfig().knobs().measured_prefill_speed is True
    assert RoutingConfig(prefill_speed="fixed").knobs().measured_prefill_speed is False
