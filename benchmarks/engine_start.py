"""vLLM engine start time and decode speed on this machine, per compilation setting (CPU).

Each variant starts the engine of ``--config``'s first model (arguments from
``deployments.engine.engine_args``, so they equal what kvserve serves) in a fresh process, ``--starts``
times in a row (the later starts show whether vLLM's compile cache is used), and measures:

  * ``start_s``: ``vllm.LLM(...)`` construction, i.e. until the engine can take requests;
  * ``decode_tok_per_s_b1`` / ``_b8``: output tokens per second generating 128 tokens (ignore_eos) for
    1 and for 8 concurrent prompts, after one warm-up request;
  * whether the log holds vLLM's "Compiling model again due to a load failure" line.

Variants: ``default`` (vLLM's CPU default: dynamo + inductor with AOT compile), ``no_aot``
(``VLLM_USE_AOT_COMPILE=0``: inductor through torch's own caches), ``eager`` (``compilation_config
{"mode": 0}``: no torch.compile; what ``engine_args`` sets on CPU replicas) and ``eager_uniproc`` (eager with
``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no worker process; starts faster, decodes far slower).

Usage: ``python -m benchmarks.engine_start [--variants default,no_aot,eager] [--starts 2] [--out PATH]``;
writes benchmarks/results/engine_start_cpu.json (command, machine, git commit, vllm version). Run it
alone on the machine (it uses every core).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> (environment, engine kwargs over engine_args'; None drops the key)
    "default": ({}, {"compilation_config": None}),
    "no_aot": ({"VLLM_USE_AOT_COMPILE": "0"}, {"compilation_config": None}),
    "eager": ({}, {"compilation_config": {"mode": 0}}),
    # The model in the EngineCore's own process, no worker process (one vLLM import fewer per start); vLLM says its
    # CPU backend cannot set OpenMP up that way, and decode measured 17x slower (engine_start_cpu_uniproc.json).
    "eager_uniproc": ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, {"compilation_config": {"mode": 0}}),
}
RELOAD_FAILURE = "Compiling model again due to a load failure"


def _child(config: str, extra_kwargs: str) -> None:
    """One engine start + decode measurement; prints one JSON line."""
    import yaml

    from deployments.engine import engine_args
    from serve_app.config import load_app_config

    doc = yaml.safe_load((ROOT / config).read_text())
    cfg = load_app_config(doc["applications"][0]["args"])
    model = cfg.models[0]
    os.environ.update(model.env)
    kwargs = engine_args(model, cfg, None)
    for key, value in json.loads(extra_kwargs).items():
        if value is None:
            kwargs.pop(key, None)
        else:
            kwargs[key] = value
    kwargs.pop("disable_log_stats", None)
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t_import = time.perf_counter()
    llm = LLM(**kwargs)
    t_start = time.perf_counter()
    params = SamplingParams(max_tokens=128, ignore_eos=True, temperature=0)
    prompt = TokensPrompt(prompt_token_ids=list(range(100, 164)))
    llm.generate([prompt], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    out = {"import_s": round(t_import - t0, 2), "start_s": round(t_start - t_import, 2)}
    for batch in (1, 8):
        prompts = [TokensPrompt(prompt_token_ids=[7 + i] + list(range(200, 263))) for i in range(batch)]
        t = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t
        out[f"decode_tok_per_s_b{batch}"] = round(sum(len(r.outputs[0].token_ids) for r in res) / dt, 1)
    print("RESULT " + json.dumps(out), flush=True)


def _run_variant(name: str, config: str, log_dir: Path) -> dict:
    env_extra, kwargs = VARIANTS[name]
    env = {**os.environ, **env_extra, "PYTHONPATH": str(ROOT)}
    log = log_dir / f"engine_start_{name}_{int(time.time())}.log"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.engine_start", "--child", config, json.dumps(kwargs)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    wall = time.perf_counter() - t
    log.write_text(proc.stdout + proc.stderr)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    row = json.loads(line[7:]) if line else {"error": f"rc={proc.returncode}, see {log}"}
    row.update(process_wall_s=round(wall, 1), recompiled_after_load_failure=RELOAD_FAILURE in proc.stdout + proc.stderr)
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cpu.yaml")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--starts", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/engine_start_cpu.json"))
    ap.add_argument("--log-dir", default="/tmp")
    a = ap.parse_args()
    from vllm import __version__ as vllm_version

    from benchmarks.bench.result import git_commit, machine_info

    commit = git_commit() or ""
    result = {"command": "python -m benchmarks.engine_start " + " ".join(sys.argv[1:]), "machine": machine_info(),
              "git_commit": commit, "vllm_version": vllm_version, "config": a.config, "variants": {}}
    for name in a.variants.split(","):
        result["variants"][name] = {"env": VARIANTS[name][0], "engine_kwargs": VARIANTS[name][1], "starts": []}
        for _ in range(a.starts):
            row = _run_variant(name, a.config, Path(a.log_dir))
            print(name, row, flush=True)
            result["variants"][name]["starts"].append(row)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
