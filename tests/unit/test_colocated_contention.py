"""The co-location microbenchmark's pure parts (``benchmarks/gpu/colocated_contention.py``): the simulator's ratio
for a cell is its contention term over the engine alone, peers of either kind counting whole by default; the comma
lists parse and bad arguments are refused before any engine starts."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.gpu import colocated_contention as cc
from benchmarks.simulator.engine import EngineModel

pytestmark = pytest.mark.unit

ARGS = argparse.Namespace(decode_tokens=128)
ENGINE = EngineModel(prefill_tokens_per_s=200_000, step_s=0.003, gpu_contention=0.4, prefill_step_s=0.005)


@pytest.mark.parametrize("what,size", [("prefill", 6144), ("decode", 4)])
def test_the_simulators_ratio_is_its_contention_per_busy_peer(what, size):
    engine = ENGINE.to_dict()
    assert cc._model_ratio(engine, what, size, 0, None, ARGS) == 1.0
    for k in (1, 2, 3):
        for peers in ("decode", "prefill"):
            assert cc._model_ratio(engine, what, size, k, peers, ARGS) == pytest.approx(1 + 0.4 * k, abs=1e-3)
    # a decoding peer counting for a share (the trial's term) only where the peers decode
    half = ENGINE.with_(decoding_peer_share=0.5).to_dict()
    assert cc._model_ratio(half, what, size, 2, "decode", ARGS) == pytest.approx(1 + 0.4, abs=1e-3)
    assert cc._model_ratio(half, what, size, 2, "prefill", ARGS) == pytest.approx(1 + 0.8, abs=1e-3)
    assert cc._model_ratio(None, what, size, 2, "prefill", ARGS) is None


def test_comma_lists_and_bad_arguments(tmp_path, capsys):
    assert cc._ints("6144, 1024") == [6144, 1024]
    with pytest.raises(argparse.ArgumentTypeError, match="comma list"):
        cc._ints("6k")
    with pytest.raises(SystemExit):
        cc.main(["--model", str(tmp_path), "--out", str(tmp_path / "o.json"), "--batch", "0"])
    assert "--batch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cc.main(["--model", str(tmp_path / "absent"), "--out", str(tmp_path / "o.json")])
    assert "not a directory" in capsys.readouterr().err
