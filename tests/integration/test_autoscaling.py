"""Autoscaling: sustained load adds a replica that takes traffic; idle removes it; no request fails.

The subject is the autoscaling of kvserve's replica deployment (Serve's autoscaler, the router sending fresh
prompts to the new replica, a replica leaving without failing requests), not the engine: the scaled model,
``AUTOSCALED`` of the shared app, runs the fake engine (tests/fakes/engine.py), whose requests take 2.4 s here.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.integration.conftest import AUTOSCALED, SHARED

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

MODEL = AUTOSCALED


def _running_replicas() -> int:
    from ray import serve

    dep = serve.status().applications["kvserve"].deployments[f"vllm-{MODEL}"]
    return dep.replica_states.get("RUNNING", 0)


async def _load(base_url: str, stop: asyncio.Event, codes: list[int], replicas: set[str], k: int) -> None:
    # A new prompt every request: a repeated prompt stays pinned to the replica caching it (cache-aware routing),
    # and the new replica would get traffic only once the first one is overloaded. Fresh prompts go by load.
    i = 0
    async with httpx.AsyncClient(timeout=300) as c:
        while not stop.is_set():
            i += 1
            prompt = [1 + (k * 5000 + i) % 40000, *range(200 + 500 * k, 400 + 500 * k)]
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 48, "ignore_eos": True}
            r = await c.post(f"{base_url}/completions", json=body)
            codes.append(r.status_code)
            if r.status_code == 200:
                replicas.add(r.headers["x-kvserve-replica"])


def test_scale_up_under_load_and_back_down_without_errors(start_app) -> None:
    base_url = start_app(overrides=SHARED)  # MODEL autoscaled 1..2, beside the vllm-cpu models
    assert _running_replicas() == 1

    async def scenario() -> tuple[list[int], set[str], bool]:
        stop, codes, replicas = asyncio.Event(), [], set()
        workers = [asyncio.create_task(_load(base_url, stop, codes, replicas, k)) for k in range(6)]
        deadline = time.time() + 480
        scaled = False
        while time.time() < deadline:  # until a second replica runs and has served requests
            await asyncio.sleep(3)
            scaled = scaled or _running_replicas() == 2
            if scaled and len(replicas) == 2:
                break
        stop.set()
        await asyncio.gather(*workers)
        return codes, replicas, scaled

    codes, replicas, scaled = asyncio.run(scenario())
    assert scaled, "no second replica under sustained load"
    assert len(replicas) == 2, f"the new replica took no traffic: {replicas}"
    assert set(codes) == {200}, f"failed requests while scaling up: {sorted(set(codes))}"

    # Idle: back to one replica; requests sent meanwhile all succeed.
    deadline = time.time() + 180
    with httpx.Client(timeout=120) as c:
        while _running_replicas() > 1 and time.time() < deadline:
            r = c.post(f"{base_url}/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200
            time.sleep(2)
    assert _running_replicas() == 1
    r = httpx.post(f"{base_url}/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=120)
    assert r.status_code == 200
