"""serveConfigV2 rules: the Serve config a RayService carries, strictly against ``ray.serve.schema``.

Owns: ``serve_config_rules(rayservice)``, which returns (messages, AppConfigs of the kvserve
applications). It checks, in order:
  - the YAML parses and ``ServeDeploySchema`` accepts it;
  - unknown keys at every nested level of the Serve schema (``grpc_options``, ``http_options``,
    deployments, ``autoscaling_config``, ``ray_actor_options``...), since Serve silently ignores them
    in models that do not forbid extras; the same for the deployment options inside the builder's args;
  - traffic reaches a proxy: ``proxy_location`` is not Disabled (nor HeadOnly with the head excluded from
    the serve service), ``http_options.host`` is not loopback, and ``http_options.port`` equals every
    Ray container's port named ``serve`` (the port <name>-serve-svc targets);
  - every ``import_path`` imports; the project's builder (``serve_app.builder:build_app``) gets its args
    validated as ``AppConfig`` (whose models feed the cross-checks); another path into the project is
    an error, because nothing would check its args;
  - every deployment of a kvserve application has a bounded queue (``unbounded_queues``: render refuses
    such a config before writing anything).
"""

from __future__ import annotations

import functools
import importlib
import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from serve_app.config import AppConfig, ConfigError, load_app_config
from serve_app.kuberay.rules import groups

BUILDER = "serve_app.builder:build_app"
_WHERE = "spec.serveConfigV2"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: The repository root: import paths whose top-level package lives here are the project's own.
_REPO = Path(__file__).resolve().parents[2]


def serve_config_rules(rayservice: dict[str, Any]) -> tuple[list[str], list[AppConfig]]:
    """Check a RayService's serveConfigV2 strictly; return (errors, the AppConfigs of kvserve applications)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    text = rayservice.get("spec", {}).get("serveConfigV2")
    if not isinstance(text, str):
        return [f"{_WHERE}: must be a YAML string, got {type(text).__name__}"], []
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f"{_WHERE}: not valid YAML: {err}"], []
    if not isinstance(doc, dict):
        return [f"{_WHERE}: must be a mapping with an applications list"], []
    errs = unknown_keys(_WHERE, doc, ServeDeploySchema)
    try:
        ServeDeploySchema.model_validate(doc)
    except ValidationError as err:
        errs += [f"{_WHERE}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
    errs += _proxy_rules(doc, rayservice)
    apps: list[AppConfig] = []
    for i, app in enumerate(doc.get("applications") or []):
        if isinstance(app, dict):
            app_errs, cfg = _app_rules(f"{_WHERE}.applications.{i}", app)
            errs += app_errs
            apps += [cfg] if cfg is not None else []
    return errs, apps


def _strip(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def unknown_keys(where: str, obj: Any, annotation: Any) -> list[str]:
    """Unknown keys of obj at every level of a (pydantic) Serve schema annotation.

    Models that forbid extras are skipped at their own level (pydantic reports those) but still walked.
    A ``Union[Dict, Model]`` (e.g. ``autoscaling_config``) is checked against the model.
    """
    annotation = _strip(annotation)
    origin, args = get_origin(annotation), [_strip(a) for a in get_args(annotation)]
    if origin in (Union, types.UnionType):
        pick = next((a for a in args if _is_model(a)), None) if isinstance(obj, dict) else None
        pick = pick or next((a for a in args if get_origin(a) in (list, dict) and isinstance(obj, get_origin(a))), None)
        return unknown_keys(where, obj, pick) if pick is not None else []
    if origin is list and isinstance(obj, list) and args:
        return [e for i, item in enumerate(obj) for e in unknown_keys(f"{where}.{i}", item, args[0])]
    if origin is dict and isinstance(obj, dict) and len(args) == 2:
        return [e for k, v in obj.items() for e in unknown_keys(f"{where}.{k}", v, args[1])]
    if not (_is_model(annotation) and isinstance(obj, dict)):
        return []
    fields = {**annotation.model_fields, **{f.alias: f for f in annotation.model_fields.values() if f.alias}}
    forbids = annotation.model_config.get("extra") == "forbid"
    errs = []
    for key, value in obj.items():
        if key in fields:
            errs += unknown_keys(f"{where}.{key}", value, fields[key].annotation)
        elif not forbids:
            errs.append(f"{where}: unknown key {key!r} (not a field of {annotation.__name__})")
    return errs


def _proxy_rules(doc: dict[str, Any], rayservice: dict[str, Any]) -> list[str]:
    """Whether <name>-serve-svc can reach an HTTP proxy at all."""
    from ray.serve.schema import HTTPOptionsSchema

    errs = []
    location = doc.get("proxy_location", "EveryNode")
    if location == "Disabled":
        errs.append(f"{_WHERE}.proxy_location: Disabled starts no HTTP proxy, so no pod is marked ray.io/serve=true "
                    "and <name>-serve-svc has no endpoints")
    if location == "HeadOnly" and rayservice.get("spec", {}).get("excludeHeadPodFromServeSvc"):
        errs.append(f"{_WHERE}.proxy_location: HeadOnly runs the only proxy on the head, but "
                    "spec.excludeHeadPodFromServeSvc removes the head from <name>-serve-svc (no endpoints)")
    http = doc.get("http_options") if isinstance(doc.get("http_options"), dict) else {}
    defaults = HTTPOptionsSchema.model_fields
    host, port = http.get("host", defaults["host"].default), http.get("port", defaults["port"].default)
    if host in _LOOPBACK:
        errs.append(f"{_WHERE}.http_options.host: {host!r} binds the proxy to loopback; <name>-serve-svc cannot "
                    "reach it (use 0.0.0.0)")
    for where, group in groups(rayservice.get("spec", {})):
        containers = group.get("template", {}).get("spec", {}).get("containers") or [{}]
        for p in containers[0].get("ports") or []:
            if p.get("name") == "serve" and p.get("containerPort") != port:
                errs.append(f"{where}.template.spec.containers.0.ports[serve]: containerPort {p.get('containerPort')} "
                            f"but {_WHERE}.http_options.port is {port}; <name>-serve-svc targets the 'serve' port, "
                            "where no proxy listens")
    return errs


def _app_rules(aw: str, app: dict[str, Any]) -> tuple[list[str], AppConfig | None]:
    from ray.serve.schema import DeploymentSchema

    path = app.get("import_path")
    if not isinstance(path, str):
        return [], None  # missing or wrong type: ServeDeploySchema reported it
    try:
        target = _resolve(path)
    except Exception as err:  # noqa: BLE001 -- import runs module code: any failure means Serve fails too
        return [f"{aw}.import_path: cannot import {path!r} ({type(err).__name__}: {err})"], None
    if target is not _resolve(BUILDER):
        if _is_project_path(path):
            return [(f"{aw}.import_path: {path!r} is a project module but not the builder {BUILDER}; its args "
                     "would go unchecked (no AppConfig, tensor-parallel or replica cross-checks)")], None
        return [], None  # a third-party application: the Serve schema checks above are all that apply
    errs: list[str] = []
    args = app.get("args") or {}
    deployments = ([(f"models.{k}", m) for k, m in enumerate(args.get("models") or [])]
                   + [("ingress", args.get("ingress"))])
    for sub, owner in deployments:
        dep = (owner or {}).get("deployment") if isinstance(owner, dict) else None
        for key in ("autoscaling_config", "ray_actor_options"):
            value = dep.get(key) if isinstance(dep, dict) else None
            errs += unknown_keys(f"{aw}.args.{sub}.deployment.{key}", value,
                                 DeploymentSchema.model_fields[key].annotation)
    try:
        cfg = load_app_config(args, where=f"{aw}.args.")
        return errs + unbounded_queues(cfg, f"{aw}.args."), cfg
    except ConfigError as err:
        return errs + [str(err).replace("invalid config:\n  ", "").replace("\n  ", "; ")], None
    except (ImportError, AttributeError) as err:  # e.g. Serve importing an autoscaling policy_function
        return errs + [f"{aw}.args: Serve cannot load it ({type(err).__name__}: {err})"], None


def unbounded_queues(app: AppConfig, where: str = "") -> list[str]:
    """A message for each deployment whose ``max_queued_requests`` is -1 (unbounded)."""
    owners = [(f"models.{k}", m.deployment) for k, m in enumerate(app.models)] + [("ingress", app.ingress.deployment)]
    return [f"{where}{sub}.deployment.max_queued_requests: -1 (unbounded): under overload requests would wait until "
            f"ingress.request_timeout_s ({app.ingress.request_timeout_s:g} s) instead of a fast 503 with Retry-After; "
            f"set a bound (e.g. {dep.max_ongoing_requests}, its max_ongoing_requests)"
            for sub, dep in owners if dep.max_queued_requests == -1]


@functools.cache
def _resolve(import_path: str) -> Any:
    """The object an import path names, the way Serve resolves it ("module:attr" or "module.attr")."""
    module, _, attr = import_path.partition(":") if ":" in import_path else import_path.rpartition(".")
    if not module or not attr:
        raise ValueError("expected 'module:attribute' or 'module.attribute'")
    return getattr(importlib.import_module(module), attr)


def _is_project_path(import_path: str) -> bool:
    top = import_path.split(":")[0].split(".")[0]
    return (_REPO / top / "__init__.py").is_file() or (_REPO / f"{top}.py").is_file()
