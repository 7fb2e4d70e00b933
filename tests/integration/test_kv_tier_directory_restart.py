"""The KV tier's directory actor on a real Ray: it runs on the head node, Ray restarts it when its process
dies, and the handle an engine already holds reaches the new instance (empty: lookups miss, stores work, and
its epoch, which engines put in their OBJ events so routers drop the old blocks, is newer)."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NAME, NAMESPACE = "kv_tier_restart_test_directory", "kvserve_restart_test"


def _wait_until(call, expected, timeout_s: float = 30.0):
    """Call ``call()`` until it answers ``expected`` (calls that meet the restart fail); return the last answer."""
    import ray

    deadline = time.monotonic() + timeout_s
    answer = None
    while time.monotonic() < deadline:
        try:
            answer = ray.get(call(), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            answer = None
        if answer == expected:
            break
        time.sleep(0.2)
    return answer


def test_directory_lives_on_the_head_and_comes_back_after_its_process_dies(ray_cluster):
    import ray

    from deployments.kv_tier.directory_actor import get_directory, head_node_id

    directory = get_directory(NAME, NAMESPACE, budget_bytes=64 * 1024**2, store_fraction=0.5, model="m")
    try:
        head = head_node_id(ray.nodes())
        assert head is not None
        assert ray.get(directory.node_id.remote()) == head

        ref = ray.put(np.zeros(4096, dtype=np.uint8))
        assert ray.get(directory.add_chunk_ref.remote("engine-a", [b"k1", b"k2"], [ref], 4096))
        assert ray.get(directory.lookup.remote([b"k1", b"k2", b"k3"])) == [True, True, False]
        epoch, _ = ray.get(directory.poll_evicted.remote("engine-a"))

        ray.kill(directory, no_restart=False)  # the process dies; Ray restarts the actor

        # The same handle (what every engine holds) answers again; the new instance starts empty.
        assert _wait_until(lambda: directory.lookup.remote([b"k1", b"k2"]), [False, False]) == [False, False]
        assert ray.get(directory.node_id.remote()) == head
        assert ray.get(directory.poll_evicted.remote("engine-a"))[0] > epoch
        ref2 = ray.put(np.ones(4096, dtype=np.uint8))
        assert ray.get(directory.add_chunk_ref.remote("engine-a", [b"k1"], [ref2], 4096))
        assert ray.get(directory.lookup.remote([b"k1"])) == [True]
        # An engine that starts now finds the same (restarted) actor by name, with what was stored since.
        again = get_directory(NAME, NAMESPACE, budget_bytes=64 * 1024**2, store_fraction=0.5, model="m")
        assert ray.get(again.lookup.remote([b"k1"])) == [True]
    finally:
        ray.kill(directory, no_restart=True)
