"""The worker pods' preStop hook on a real multi-node Ray: draining a node lets its in-flight request
finish there, Serve moves the replica to another node, and the hook returns once the node is empty."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.drain_scenario import SLEEP_S

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SCENARIO = Path(__file__).with_name("drain_scenario.py")


def test_drain_moves_the_replica_and_keeps_the_inflight_request():
    proc = subprocess.run([sys.executable, str(SCENARIO)], check=False, capture_output=True, text=True, timeout=280)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1])
    assert out["before"] == out["a"]  # the replica started on the node being drained
    assert out["inflight"] == {"slept_s": SLEEP_S, "node": out["a"]}  # its request finished there, not cut
    assert out["after"] == out["b"]  # and the deployment serves from the other node now
    assert out["drained"] and out["left"] == [0, None]
    # waited for the request (sent 1 s before the drain began), returned well before the deadline
    assert SLEEP_S - 2 <= out["drain_s"] < 60
