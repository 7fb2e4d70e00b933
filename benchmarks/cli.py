"""The ``bench`` subcommand: ``register(subparsers)`` adds it to a CLI (``kvserve bench``).

Owns the argument definitions only; ``benchmarks.bench.command.run_bench`` does the work and
returns the exit code (the parser sets ``func``). Until the project CLI wires it in, run it as
``python -m benchmarks.cli bench ...``.

    kvserve bench --model M --workload random --input-len 1024 --output-len 128 \\
        --concurrency 64 --num-requests 640 --output c64.json
    kvserve bench --compare a.json b.json --plot-dir plots/
"""

from __future__ import annotations

import argparse
import logging
import sys

from benchmarks.bench.cost import DEFAULT_GPU_HOUR_USD
from serve_app import settings


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--base-url", default=settings.base_url(),
                   help="OpenAI base URL, e.g. http://127.0.0.1:8000/v1 "
                        "(default from KVSERVE_HTTP_HOST/PORT: %(default)s)")
    g.add_argument("--model", help="model name to request (default: the first one GET /models lists)")
    g.add_argument("--label", help="system name for plots and tables (default: host:port of --base-url)")
    g.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--header", action="append", metavar="NAME:VALUE", help="extra HTTP header (repeatable)")

    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=["random", "docqa", "multiturn", "mooncake"], default="random")
    g.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals (default %(default)s)")
    g.add_argument("--prompt-salt", help="salt of the prompts (default: the load level, e.g. c64, so runs at "
                   "other levels never hit this run's prefix cache; '' = prompts depend on --seed only)")
    g.add_argument("--no-sharing", action="store_true", help="control run: same lengths, no shared prefixes")
    g.add_argument("--output-len", type=int, help="output tokens per request (random 128, docqa 64, multiturn 128)")
    g.add_argument("--vocab-range", default="1000:30000", metavar="LO:HI", help="token ids drawn from [LO, HI)")
    g.add_argument("--input-len", type=int, default=1024, help="random: prompt tokens (default %(default)s)")
    g.add_argument("--docs", type=int, default=4, help="docqa: number of shared documents (default %(default)s)")
    g.add_argument("--doc-tokens", default="4096:8192", metavar="LO:HI", help="docqa: document length range")
    g.add_argument("--question-tokens", default="32:64", metavar="LO:HI", help="docqa: question length range")
    g.add_argument("--api", choices=["completions", "chat"], default="completions",
                   help="docqa: token-id completions prompts (exact lengths) or chat text")
    g.add_argument("--sessions", type=int, default=64, help="multiturn: sessions (0 = endless; default %(default)s)")
    g.add_argument("--turns", type=int, default=8, help="multiturn: turns per session (default %(default)s)")
    g.add_argument("--system-words", type=int, default=512, help="multiturn: system prompt words")
    g.add_argument("--user-words", default="32:96", metavar="LO:HI", help="multiturn: words per user message")
    g.add_argument("--shared-system", action="store_true", help="multiturn: all sessions share one system prompt")
    g.add_argument("--session-width", type=int,
                   help="sessions open at once, interleaved round-robin (default: max(16, concurrency))")
    g.add_argument("--trace-file", default=str(settings.mooncake_trace()),
                   help="mooncake: trace JSONL (default from KVSERVE_MOONCAKE_TRACE: %(default)s)")
    g.add_argument("--trace-start", type=int, default=0, help="mooncake: skip this many trace lines")
    g.add_argument("--block-tokens", type=int, default=512, help="mooncake: tokens per trace hash block")
    g.add_argument("--input-scale", type=float, help="mooncake: input length factor (default block-tokens/512)")
    g.add_argument("--max-input-tokens", type=int, help="mooncake: cap on prompt tokens (fit the context)")
    g.add_argument("--output-scale", type=float, default=1.0, help="mooncake: output length factor")
    g.add_argument("--max-output-tokens", type=int, help="mooncake: cap on output tokens")
    g.add_argument("--time-scale", type=float, default=1.0, help="mooncake: replay speed-up (10 = 10x faster)")

    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    g.add_argument("--rate", type=float, help="open loop: Poisson arrivals, requests/s")
    g.add_argument("--trace", action="store_true", help="open loop at the trace's timestamps (mooncake default)")
    g.add_argument("--num-requests", type=int, help="measured requests (mooncake: trace lines replayed)")
    g.add_argument("--duration", type=float, help="seconds after which no new request is sent")
    g.add_argument("--warmup", type=int, default=4, help="unmeasured warm-up requests first (default %(default)s)")
    g.add_argument("--max-inflight", type=int, help="open loop: cap on requests in flight (default none)")

    g = p.add_argument_group("client")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--no-ignore-eos", action="store_true", help="do not send the vLLM extension ignore_eos")
    g.add_argument("--extra-body", metavar="JSON", help="JSON object merged into every request body")
    g.add_argument("--processes", type=int, default=1,
                   help="client processes sharing the load (concurrency, rate, trace lines and sessions split "
                   "between them; one merged result). Use when summary.client.cpu_util nears 1 (default %(default)s)")
    g.add_argument("--server-timing", action="store_true",
                   help="read each answer's Server-Timing header (a kvserve ingress with ingress.server_timing_header) "
                   "and httpx's trace: summary.server_timing_ms splits the time to the first chunk into the client's "
                   "send, the way to the ingress, the ingress's stages and the way back")

    g = p.add_argument_group("output")
    g.add_argument("--output", "-o", help="result JSON path (default bench-LABEL-WORKLOAD-LOAD-TIME.json)")
    g.add_argument("--per-request", action="store_true", help="also store every request's record")
    g.add_argument("--gpu-hour-usd", type=float, default=DEFAULT_GPU_HOUR_USD,
                   help="price of one GPU-hour for the cost per 1K tokens (default %(default)s: H200, see "
                   "benchmarks/bench/cost.py)")
    g.add_argument("--gpus", type=float, help="GPUs serving the endpoint, for the cost (default: the GPUs "
                   "nvidia-smi lists on this machine, else 1)")
    g.add_argument("--compare", nargs="+", metavar="RESULT", help="no run: plot and tabulate these result JSONs")
    g.add_argument("--plot-dir", default="bench-plots", help="--compare: output folder (default %(default)s)")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``subparsers``; it sets ``func`` returning an exit code."""
    p = subparsers.add_parser("bench", help="benchmark any OpenAI-compatible endpoint over HTTP",
                              description="Streamed load against an OpenAI base URL; writes one result JSON.")
    _add_run_args(p)
    p.set_defaults(func=_dispatch)
    return p


def _dispatch(args: argparse.Namespace) -> int:
    from benchmarks.bench.command import run_bench

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # no-op if set up
    return run_bench(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvserve")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
