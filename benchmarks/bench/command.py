"""``kvserve bench``: turn parsed CLI arguments into a run (or a comparison) and an exit code.

Owns ``run_bench`` (the argparse ``func``), argument validation into ``LoadSpec``/workload objects,
the server preflight (``GET /models``: reachability and model choice) and the one-line error
messages. Machine info is collected before the event loop starts; everything inside it is async.
``--processes N`` (N > 1) runs the load in N client processes (``procs``) after a preflight here.

Exit codes: 0 run written (some requests may have failed: see ``errors`` in the JSON); 1 the server
is unreachable, the model is unknown, every warm-up or every measured request failed; 2 bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

import httpx

from benchmarks.bench.client import ClientSettings
from benchmarks.bench.cost import DEFAULT_GPU_HOUR_USD
from benchmarks.bench.loadgen import LoadSpec, RunOutcome, run_load
from benchmarks.bench.procs import ClientProcessError, run_processes
from benchmarks.bench.result import build_result, default_output, format_summary, machine_info, utc_now, write_result
from benchmarks.bench.split import check_split, split_load
from benchmarks.bench.workloads import make_workload

logger = logging.getLogger(__name__)

_FLAGS = {"concurrency": "--concurrency", "rate": "--rate", "num_requests": "--num-requests", "duration": "--duration",
          "warmup": "--warmup", "width": "--session-width", "max_inflight": "--max-inflight"}
DEFAULT_OUTPUT_LEN = {"random": 128, "docqa": 64, "multiturn": 128, "mooncake": None}


class BenchError(Exception):
    """A user-facing failure: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def parse_range(text: str, flag: str) -> tuple[int, int]:
    """``"LO:HI"`` or ``"N"`` -> (lo, hi) of non-negative ints."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        raise BenchError(f"{flag} must be N or LO:HI integers, got {text!r}", 2) from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or parts[0] < 0 or parts[0] > parts[1]:
        raise BenchError(f"{flag} must be N or LO:HI with 0 <= LO <= HI, got {text!r}", 2)
    return parts[0], parts[1]


def prompt_seed(args: argparse.Namespace) -> int | str:
    """The seed of the prompts: ``--seed``, salted by ``--prompt-salt`` (default: the load level).

    Salting by load level keeps consecutive runs against one server (c=1, then c=64) from hitting
    each other's prefix cache, while two systems measured at the same level get identical prompts.
    """
    salt = args.prompt_salt
    if salt is None:
        salt = (f"c{args.concurrency}" if args.concurrency is not None else f"r{args.rate:g}" if args.rate is not None
                else "trace" if args.trace or args.workload == "mooncake" else "c1")
    return f"{args.seed}/{salt}" if salt else args.seed


def build_workload(args: argparse.Namespace):
    out_len = args.output_len if args.output_len is not None else DEFAULT_OUTPUT_LEN[args.workload]
    vocab = parse_range(args.vocab_range, "--vocab-range")
    if vocab[0] == vocab[1]:
        raise BenchError(f"--vocab-range must be LO:HI with LO < HI, got {args.vocab_range!r}", 2)
    common = {"seed": prompt_seed(args)}
    if args.workload == "random":
        if args.no_sharing:
            logger.info("random prompts share nothing already; --no-sharing changes nothing")
        params = {**common, "input_len": args.input_len, "output_len": out_len, "vocab": vocab}
    elif args.workload == "docqa":
        params = {**common, "num_docs": args.docs, "doc_tokens": parse_range(args.doc_tokens, "--doc-tokens"),
                  "question_tokens": parse_range(args.question_tokens, "--question-tokens"),
                  "output_len": out_len, "api": args.api, "no_sharing": args.no_sharing, "vocab": vocab}
    elif args.workload == "multiturn":
        params = {**common, "num_sessions": args.sessions, "turns": args.turns, "system_words": args.system_words,
                  "user_words": parse_range(args.user_words, "--user-words"), "output_len": out_len,
                  "no_sharing": args.no_sharing, "shared_system": args.shared_system}
    else:
        params = {**common, "path": Path(args.trace_file), "block_tokens": args.block_tokens,
                  "input_scale": args.input_scale, "max_input_tokens": args.max_input_tokens,
                  "output_scale": args.output_scale, "max_output_tokens": args.max_output_tokens or out_len,
                  "time_scale": args.time_scale, "start": args.trace_start, "limit": args.num_requests,
                  "no_sharing": args.no_sharing, "vocab": vocab}
    try:
        return make_workload(args.workload, **params)
    except ValueError as exc:
        raise BenchError(str(exc), 2) from None


def build_load(args: argparse.Namespace, workload) -> LoadSpec:
    modes = [m for m, given in (("concurrency", args.concurrency is not None), ("rate", args.rate is not None),
                                ("trace", args.trace)) if given]
    if len(modes) > 1:
        raise BenchError(f"choose one load mode, got {' and '.join('--' + m for m in modes)}", 2)
    mode = modes[0] if modes else ("trace" if workload.timed else "concurrency")
    if mode == "trace" and not workload.timed:
        raise BenchError(f"--trace needs a timed workload (mooncake); {workload.name} has no timestamps", 2)
    if not workload.timed and args.num_requests is None and args.duration is None:
        raise BenchError(f"{workload.name} is endless: bound the run with --num-requests or --duration", 2)
    try:
        if args.request_timeout <= 0:
            raise ValueError(f"--request-timeout must be > 0 s, got {args.request_timeout}")
        spec = LoadSpec(mode=mode, concurrency=1 if args.concurrency is None else args.concurrency,
                        rate=1.0 if args.rate is None else args.rate,
                        num_requests=args.num_requests, duration_s=args.duration, warmup=args.warmup,
                        width=args.session_width, max_inflight=args.max_inflight, seed=args.seed)
        check_split(spec, processes(args))
        return spec
    except ValueError as exc:
        message = str(exc)
        field = message.split(" ", 1)[0]
        raise BenchError(_FLAGS.get(field, field) + message[len(field):], 2) from None


def parse_extra(args: argparse.Namespace) -> tuple[dict, dict]:
    """(extra JSON body fields, extra HTTP headers) from --extra-body / --header / --api-key."""
    extra: dict = {}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except ValueError as exc:
            raise BenchError(f"--extra-body is not valid JSON: {exc}", 2) from None
        if not isinstance(extra, dict):
            raise BenchError("--extra-body must be a JSON object", 2)
    headers: dict = {}
    for item in args.header or []:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise BenchError(f"--header must be NAME:VALUE, got {item!r}", 2)
        headers[name.strip()] = value.strip()
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    return extra, headers


async def preflight(http: httpx.AsyncClient, base_url: str, model: str | None) -> str:
    """Check the server answers ``GET /models`` and return the model to use."""
    url = f"{base_url}/models"
    try:
        response = await http.get(url, timeout=10.0)
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
    if response.status_code == 404 and model is not None:
        logger.warning("%s answered 404; using --model %s without checking it", url, model)
        return model
    if response.status_code != 200:
        raise BenchError(f"{url} answered HTTP {response.status_code}: {response.text[:200]}")
    try:
        served = [m["id"] for m in response.json().get("data", [])]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise BenchError(f"{url} did not return an OpenAI model list") from None
    if model is None:
        if not served:
            raise BenchError(f"{url} lists no models; pass --model")
        return served[0]
    if served and model not in served:
        raise BenchError(f"model {model!r} is not served at {base_url}; served: {', '.join(served)}")
    return model


def processes(args: argparse.Namespace) -> int:
    """``--processes`` (1 where the namespace predates the flag)."""
    n = getattr(args, "processes", None)
    return 1 if n is None else n


def client_settings(args: argparse.Namespace, model: str | None, extra: dict, headers: dict) -> ClientSettings:
    return ClientSettings(base_url=args.base_url.rstrip("/"), model=model or "", headers=headers, extra_body=extra,
                          ignore_eos=not args.no_ignore_eos, temperature=args.temperature,
                          request_timeout_s=args.request_timeout,
                          server_timing=bool(getattr(args, "server_timing", False)))


async def _run(args: argparse.Namespace, workload, spec: LoadSpec, extra: dict, headers: dict) -> tuple:
    settings = client_settings(args, args.model, extra, headers)
    async with settings.open(spec.max_connections) as http:
        model = await preflight(http, settings.base_url, args.model)
        logger.info("bench: %s %s against %s model=%s params=%s", workload.name, spec, settings.base_url, model,
                    workload.params())
        client = client_settings(args, model, extra, headers).client(http)
        started_at = utc_now()
        outcome = await run_load(client, workload.sessions(), spec, keep_text=workload.needs_answers,
                                 warmup=workload.warmup(spec.warmup) if spec.warmup else None)
    return model, started_at, outcome


def _run_processes(args: argparse.Namespace, workload, spec: LoadSpec, extra: dict,
                   headers: dict) -> tuple[str, object, RunOutcome]:
    """The run in ``--processes`` client processes: preflight here, then ``procs.run_processes``."""
    settings = client_settings(args, args.model, extra, headers)

    async def check() -> str:
        async with settings.open(1) as http:
            return await preflight(http, settings.base_url, args.model)

    model = asyncio.run(check())
    specs = split_load(spec, processes(args))
    logger.info("bench: %s %s in %d processes against %s model=%s params=%s", workload.name, spec, len(specs),
                settings.base_url, model, workload.params())
    try:
        started_at, outcome = run_processes(workload, specs, workload.warmup(spec.warmup) if spec.warmup else [],
                                            client_settings(args, model, extra, headers),
                                            keep_text=workload.needs_answers)
    except ClientProcessError as exc:
        raise BenchError(str(exc)) from None
    return model, started_at, outcome


def run_bench(args: argparse.Namespace) -> int:
    """Entry point of ``kvserve bench``; returns the process exit code."""
    if args.compare:
        from benchmarks.bench.compare import compare_files

        try:
            return compare_files([Path(p) for p in args.compare], Path(args.plot_dir))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        if getattr(args, "gpu_hour_usd", 0.0) < 0 or (getattr(args, "gpus", None) is not None and args.gpus <= 0):
            raise BenchError("--gpu-hour-usd must be >= 0 and --gpus > 0", 2)
        workload = build_workload(args)
        spec = build_load(args, workload)
        extra, headers = parse_extra(args)
        machine = machine_info()
        if processes(args) > 1:
            model, started_at, outcome = _run_processes(args, workload, spec, extra, headers)
        else:
            model, started_at, outcome = asyncio.run(_run(args, workload, spec, extra, headers))
        warm = outcome.warmup_records
        if warm and not any(r.ok for r in warm):
            raise BenchError(f"all {len(warm)} warm-up requests failed; first: {warm[0].error}: {warm[0].detail}")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    label = args.label or f"{args.base_url.split('//')[-1].split('/')[0]}"
    client_cfg = {"ignore_eos": not args.no_ignore_eos, "temperature": args.temperature,
                  "request_timeout_s": args.request_timeout, "extra_body": extra, "headers": sorted(headers),
                  "processes": processes(args), "server_timing": bool(getattr(args, "server_timing", False))}
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    result = build_result(label=label, workload=workload, spec=spec, base_url=args.base_url, model=model,
                          seed=args.seed, client=client_cfg, argv=argv, machine=machine,
                          started_at=started_at, outcome=outcome, per_request=args.per_request,
                          gpus=getattr(args, "gpus", None),
                          gpu_hour_usd=getattr(args, "gpu_hour_usd", DEFAULT_GPU_HOUR_USD))
    path = Path(args.output) if args.output else default_output(label, workload.name, spec, started_at)
    write_result(result, path)
    print(format_summary(result))
    print(f"wrote {path}")
    if result["headline"]["completed"] == 0:
        print(f"error: no request succeeded ({result['summary']['errors']['by_kind']})", file=sys.stderr)
        return 1
    return 0
