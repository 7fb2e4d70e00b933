"""The ``kvserve`` command line.

Owns: argument parsing and the small commands (``prepare-model``, ``invoke``, ``check-config``; ``serve``
lives in ``serve_app.launcher``);
bigger command groups register themselves (``bench`` from benchmarks/, ``kuberay`` from
serve_app/kuberay/). Errors print one precise line to stderr and exit with status 2 (bad input) or
1 (the action failed), never a traceback for expected failures.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from serve_app import settings


def _prepare_model(args: argparse.Namespace) -> int:
    from serve_app.prepare_model import PrepareError, prepare_smollm2, write_shape

    out = settings.model_dir() if args.model_dir is None else args.model_dir
    try:
        print(prepare_smollm2(out, force=args.force))
        for shape in args.shape or []:
            print(write_shape(out, shape, force=args.force))
    except PrepareError as err:
        print(f"kvserve prepare-model: {err}", file=sys.stderr)
        return 1
    return 0


def _invoke(args: argparse.Namespace) -> int:
    import openai

    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=args.timeout)
    try:
        model = args.model or client.models.list().data[0].id
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": args.message}], stream=True,
            max_tokens=args.max_tokens, temperature=args.temperature,
            stream_options={"include_usage": True},
        )
        usage = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
            usage = chunk.usage or usage
        print()
        if usage is not None:
            cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
            print(f"[{usage.prompt_tokens} prompt tokens ({cached} cached), {usage.completion_tokens} completion]",
                  file=sys.stderr)
    except openai.APIConnectionError:
        print(f"kvserve invoke: cannot reach {args.base_url} (is the service running?)", file=sys.stderr)
        return 1
    except openai.APIStatusError as err:
        print(f"kvserve invoke: HTTP {err.status_code}: {err.message}", file=sys.stderr)
        return 1
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from serve_app.config import ConfigError, load_serve_config

    try:
        _, apps = load_serve_config(args.config)
    except ConfigError as err:
        print(f"kvserve check-config: {err}", file=sys.stderr)
        return 2
    for app in apps:
        print(f"ok: models={[m.id for m in app.models]} routing={app.routing.strategy} kv_tier={app.kv_tier.enabled}")
    return 0


def _haproxy_wrapper(args: argparse.Namespace) -> int:
    from serve_app.haproxy_guard import write_wrapper

    try:
        print(write_wrapper(args.path))
    except RuntimeError as err:
        print(f"kvserve haproxy-wrapper: {err}", file=sys.stderr)
        return 2
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvserve", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    from serve_app.prepare_model import SHAPES

    pm = sub.add_parser("prepare-model", help="write SmolLM2 (and optional shape dirs) into the model dir")
    pm.add_argument("--shape", action="append", choices=sorted(SHAPES),
                    help="also write a weightless shape dir for load_format=dummy (repeatable)")
    pm.add_argument("--model-dir", type=lambda s: Path(s).expanduser(), default=None,
                    help="output directory (default: KVSERVE_MODEL_DIR)")
    pm.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    pm.set_defaults(func=_prepare_model)

    inv = sub.add_parser("invoke", help="send one chat message and stream the answer")
    inv.add_argument("message", help="the user message")
    inv.add_argument("--model", help="model id (default: the first one served)")
    inv.add_argument("--base-url", default=settings.base_url(), help="OpenAI base URL of the service")
    inv.add_argument("--max-tokens", type=int, default=128)
    inv.add_argument("--temperature", type=float, default=0.0)
    inv.add_argument("--timeout", type=float, default=120.0)
    inv.set_defaults(func=_invoke)

    sv = sub.add_parser("serve", help="run a config file in the foreground (Ctrl-C / SIGTERM stops everything)")
    sv.add_argument("config", nargs="?", default="configs/cpu.yaml")
    sv.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of starting one; the stop "
                    "then removes the apps and leaves Ray running")
    sv.add_argument("--fast-path", action="store_true",
                    help="HAProxy in front of the ingress replicas (settings.SERVE_FAST_PATH_ENV, as the GPU configs "
                    "are measured), tied to its proxy by `kvserve haproxy-wrapper`; with --address, set them where "
                    "that Ray was started instead")
    sv.set_defaults(func=lambda a: __import__("serve_app.launcher", fromlist=["run"]).run(
        a.config, a.address, a.fast_path))

    cc = sub.add_parser("check-config", help="validate a Serve config file without starting anything")
    cc.add_argument("config")
    cc.set_defaults(func=_check_config)

    hw = sub.add_parser("haproxy-wrapper", help="write the script that ties Serve's HAProxy to its proxy; print "
                        "its path (for RAY_SERVE_HAPROXY_BINARY_PATH)")
    hw.add_argument("--path", type=Path, default=None, help="where to write it (default /tmp/kvserve/kvserve-haproxy)")
    hw.set_defaults(func=_haproxy_wrapper)

    for module in ("benchmarks.cli", "serve_app.kuberay.cli", "serve_app.drain"):
        __import__(module, fromlist=["register"]).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
