"""The ``kvserve kuberay`` command group: render kuberay/ from configs/, and validate manifests offline.

Owns: ``register(subparsers)`` (called by serve_app/cli.py) and a ``__main__`` entry
(``python -m serve_app.kuberay.cli ...``).

  kvserve kuberay render            regenerate kuberay/ from configs/eks/targets.yaml and the Serve configs
  kvserve kuberay render --check    exit 1 if kuberay/ differs from what render would write (CI)
  kvserve kuberay validate FILE...  validate manifests together; exit 1 listing every problem

Exit status: 0 ok, 1 drift or invalid manifests, 2 bad input (unreadable config or YAML).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from serve_app.config import ConfigError

logger = logging.getLogger(__name__)


def _render(args: argparse.Namespace) -> int:
    from serve_app.kuberay import render

    root = Path(args.root).resolve() if args.root else render.repo_root()
    try:
        if args.check:
            drifted = render.drift(root)
            if drifted:
                print("kvserve kuberay render --check: kuberay/ is out of date with configs/ "
                      f"(run `kvserve kuberay render`): {', '.join(drifted)}", file=sys.stderr)
                return 1
            print("kuberay/ is up to date")
            return 0
        changed = render.write(root)
    except ConfigError as err:
        print(f"kvserve kuberay render: {err}", file=sys.stderr)
        return 2
    print("\n".join(changed) if changed else "kuberay/ already up to date")
    if not args.no_validate:
        return _validate_paths(sorted((root / render.OUT_DIR).glob("*.yaml")), None, render.ray_version(root))
    return 0


def _validate_paths(paths: list[Path], schema_dir: Path | None, ray_version: str | None) -> int:
    from serve_app.kuberay.validate import validate_files

    try:
        problems = validate_files(paths, schema_dir=schema_dir, ray_version=ray_version)
    except (ValueError, FileNotFoundError) as err:
        print(f"kvserve kuberay validate: {err}", file=sys.stderr)
        return 2
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {len(paths)} file(s)", file=sys.stderr)
        return 1
    print(f"{len(paths)} file(s) valid")
    return 0


def _validate(args: argparse.Namespace) -> int:
    ray_version = None
    if args.dockerfile:
        from serve_app.kuberay.render import dockerfile_ray_version

        try:
            ray_version = dockerfile_ray_version(Path(args.dockerfile))
        except ConfigError as err:
            print(f"kvserve kuberay validate: {err}", file=sys.stderr)
            return 2
    schema_dir = Path(args.schemas) if args.schemas else None
    return _validate_paths([Path(f) for f in args.files], schema_dir, ray_version)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``kuberay`` command group to the kvserve CLI."""
    kr = subparsers.add_parser("kuberay", help="render and validate the KubeRay/EKS manifests in kuberay/")
    sub = kr.add_subparsers(dest="kuberay_command", required=True)
    r = sub.add_parser("render", help="regenerate kuberay/ from configs/ (serveConfigV2 comes from the Serve config)")
    r.add_argument("--check", action="store_true", help="only compare; exit 1 if kuberay/ drifted")
    r.add_argument("--no-validate", action="store_true", help="skip validating what was written")
    r.add_argument("--root", help="repository root (default: the one this package lives in)")
    r.set_defaults(func=_render)
    v = sub.add_parser("validate", help="validate manifests offline (schemas, operator rules, cross-checks)")
    v.add_argument("files", nargs="+", help="manifest files, validated together")
    v.add_argument("--schemas", help="CRD schema directory (default: kuberay/schemas in the repo)")
    v.add_argument("--dockerfile", help="check rayVersion against this Dockerfile's ARG RAY_VERSION")
    v.set_defaults(func=_validate)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m serve_app.kuberay.cli render|validate ...``."""
    parser = argparse.ArgumentParser(prog="kvserve", description="kvserve KubeRay manifests")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["kuberay", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
