"""The result JSON of one run, and the machine it ran on.

Owns ``machine_info`` (hostname, platform, Python, CPU count, GPU names from ``nvidia-smi`` when it
exists), ``git_commit`` (the checkout's HEAD, the code a benchmark measures), ``build_result`` and
``write_result``. Schema ``kvserve.bench/1``:

    {"schema", "label",
     "config":   {workload: {name, seed, ...params}, load: {mode, level, ...}, base_url, model, seed,
                  client: {...}, command, argv, machine, started_at},
     "summary":  stats.summarize(...)   per-metric p50/p90/p99/mean, throughput, cache-hit rate, errors
     "headline": stats.headline(...)    flat numbers: ttft_p50_ms, output_tok_per_s, ...
     "cost":     cost.token_costs(...)  cost per 1K input/output tokens at a GPU-hour price
     "samples":  {ttft_ms: [...], e2e_ms: [...]}   per successful request, in completion order
     "requests": [...]                  only with --per-request; never prompt text}

``machine_info`` runs a subprocess: call it before the event loop starts, not from async code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shlex
import shutil
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.bench.cost import DEFAULT_GPU_HOUR_USD, token_costs
from benchmarks.bench.loadgen import LoadSpec, RunOutcome
from benchmarks.bench.stats import headline, summarize

logger = logging.getLogger(__name__)

SCHEMA = "kvserve.bench/1"


def machine_info() -> dict:
    """Describe this machine; GPU names come from ``nvidia-smi`` when it is on PATH."""
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "gpus": []}
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10, check=False).stdout
            info["gpus"] = [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError) as exc:
            logger.warning("nvidia-smi failed: %s", exc)
    return info


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of this checkout (None where git or the repository is missing)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[2],
                              capture_output=True, text=True, check=False)
    except OSError:
        return None
    return done.stdout.strip() or None


def command_line(argv: list[str]) -> str:
    """The command as typed: ``kvserve bench ...`` with shell quoting."""
    return shlex.join(["kvserve", *argv])


def _record_row(record) -> dict:
    row = dataclasses.asdict(record)
    row.pop("text", None)
    row["itl_s"] = list(record.itl_s)
    return row


def build_result(*, label: str, workload, spec: LoadSpec, base_url: str, model: str, seed: int, client: dict,
                 argv: list[str], machine: dict, started_at: datetime, outcome: RunOutcome,
                 per_request: bool = False, gpus: float | None = None,
                 gpu_hour_usd: float = DEFAULT_GPU_HOUR_USD) -> dict:
    """Assemble the result JSON object (see module docstring)."""
    summary = summarize(outcome)
    load = {"mode": spec.mode, "level": spec.level, "num_requests": spec.num_requests, "duration_s": spec.duration_s,
            "warmup": spec.warmup, "session_width": spec.session_width, "max_inflight": spec.max_inflight}
    if spec.mode == "concurrency":
        load["concurrency"] = spec.concurrency
    elif spec.mode == "rate":
        load["rate"] = spec.rate
    ok = [r for r in outcome.records if r.ok]
    result = {
        "schema": SCHEMA,
        "label": label,
        "config": {
            "workload": {"name": workload.name, "seed": getattr(workload, "seed", seed), **workload.params()},
            "load": load, "base_url": base_url, "model": model, "seed": seed, "client": client,
            "command": command_line(argv), "argv": argv, "machine": machine,
            "started_at": started_at.astimezone(UTC).isoformat(timespec="seconds"),
        },
        "summary": summary,
        "headline": headline(summary),
        "cost": token_costs(gpus=gpus if gpus is not None else max(1, len(machine.get("gpus") or [])),
                            duration_s=summary["duration_s"], input_tokens=summary["tokens"]["prompt_total"],
                            output_tokens=summary["tokens"]["output_total"], gpu_hour_usd=gpu_hour_usd),
        "samples": {"ttft_ms": [round(r.ttft_s * 1000, 3) for r in ok if r.ttft_s is not None],
                    "e2e_ms": [round(r.e2e_s * 1000, 3) for r in ok if r.e2e_s is not None]},
    }
    if per_request:
        result["requests"] = [_record_row(r) for r in outcome.records]
    return result


def default_output(label: str, workload: str, spec: LoadSpec, started_at: datetime) -> Path:
    level = {"concurrency": f"c{spec.concurrency}", "rate": f"r{spec.rate:g}", "trace": "trace"}[spec.mode]
    stamp = started_at.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
    return Path(f"bench-{safe}-{workload}-{level}-{stamp}.json")


def write_result(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_summary(result: dict) -> str:
    """A few human lines about a run (numbers only, never prompts)."""
    h, s = result["headline"], result["summary"]
    load = result["config"]["load"]

    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f} ms"

    level = "trace replay" if load["mode"] == "trace" else f"{load['mode']}={load['level']:g}"
    hit = "n/a" if h["cache_hit_rate"] is None else f"{h['cache_hit_rate']:.1%}"
    client = s["client"]
    cpu = f"client cpu {client['cpu_util']:.0%}"
    if client.get("processes"):
        busiest = max(p["cpu_util"] for p in client["processes"])
        cpu += f" in {len(client['processes'])} processes (busiest {busiest:.0%})"
    cpu += f", lag max {client['max_schedule_lag_ms']:.1f} ms"
    lines = [
        (f"{result['label']}: {result['config']['workload']['name']} {level} "
         f"completed={h['completed']} errors={h['errors']} in {s['duration_s']:.1f}s"),
        (f"  TTFT p50 {ms(h['ttft_p50_ms'])}  p90 {ms(h['ttft_p90_ms'])}  p99 {ms(h['ttft_p99_ms'])}  "
         f"ITL p50 {ms(h['itl_p50_ms'])}  E2E p50 {ms(h['e2e_p50_ms'])}"),
        f"  output {h['output_tok_per_s']:.1f} tok/s  {h['requests_per_s']:.2f} req/s  cache hit {hit}  {cpu}",
    ]
    c = result.get("cost")
    if c and c["cost_per_1k_output_tokens_usd"] is not None:
        lines.append(f"  cost at ${c['gpu_hour_usd']:g}/GPU-h x {c['gpus']:g} GPU: "
                     f"${c['cost_per_1k_input_tokens_usd']:.6f} per 1K input, "
                     f"${c['cost_per_1k_output_tokens_usd']:.6f} per 1K output tokens")
    if s["errors"]["by_kind"]:
        lines.append(f"  errors by kind: {s['errors']['by_kind']}; first: {s['errors']['samples'][0]}")
    return "\n".join(lines)
