"""Rules the CRD schemas do not express: KubeRay operator validation and a strict serveConfigV2 check.

Owns: ``rayservice_rules`` (KubeRay ``validation.go`` behaviour, reimplemented: name <= 47 chars and
DNS-1035, upgradeStrategy values, no headService name, 0 <= minReplicas <= replicas <= maxReplicas,
incremental-upgrade prerequisites, autoscaler v2 restartPolicy, no resource both in rayStartParams and
resources, head ports include ``serve``; plus integer rayStartParams, which ``ray start`` needs),
``serve_config_rules`` (serveConfigV2 against ``ray.serve.schema`` with unknown keys rejected at
every level, then the project's ``AppConfig``) and ``karpenter_rules`` (the Karpenter CEL rules that
matter here).
Each function returns a list of precise messages, "path: problem"; empty means valid.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from serve_app.config import AppConfig, ConfigError, load_app_config

DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_RAYSERVICE_NAME = 47
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
#: rayStartParams key -> the ``resources`` key that means the same resource.
_START_PARAM_RESOURCES = {"num-cpus": "CPU", "num-gpus": "GPU", "memory": "memory"}
BUILDER = "serve_app.builder:build_app"
#: rayStartParams that `ray start` parses as integers (a fraction makes the pod crash-loop).
_INT_START_PARAMS = ("num-cpus", "num-gpus", "memory", "object-store-memory", "metrics-export-port")


def _groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rcc = spec.get("rayClusterConfig", {})
    out = [("spec.rayClusterConfig.headGroupSpec", rcc.get("headGroupSpec", {}))]
    out += [(f"spec.rayClusterConfig.workerGroupSpecs.{i}", g) for i, g in enumerate(rcc.get("workerGroupSpecs", []))]
    return out


def rayservice_rules(doc: dict[str, Any]) -> list[str]:
    """KubeRay operator checks of a RayService (those the API server would let through)."""
    errs: list[str] = []
    name = doc.get("metadata", {}).get("name", "")
    if len(name) > MAX_RAYSERVICE_NAME:
        errs.append(f"metadata.name: {name!r} is {len(name)} characters; KubeRay allows at most "
                    f"{MAX_RAYSERVICE_NAME} (it derives <name>-serve-svc and RayCluster names from it)")
    if not DNS1035.fullmatch(name):
        errs.append(f"metadata.name: {name!r} is not a DNS-1035 label")
    spec = doc.get("spec", {})
    upgrade = spec.get("upgradeStrategy", {})
    utype = upgrade.get("type")
    if utype is not None and utype not in UPGRADE_TYPES:
        errs.append(f"spec.upgradeStrategy.type: {utype!r} is not one of {list(UPGRADE_TYPES)}")
    rcc = spec.get("rayClusterConfig", {})
    if utype == "NewClusterWithIncrementalUpgrade":
        opts = upgrade.get("clusterUpgradeOptions") or {}
        if not rcc.get("enableInTreeAutoscaling"):
            errs.append("spec.upgradeStrategy: NewClusterWithIncrementalUpgrade needs enableInTreeAutoscaling")
        if not opts.get("gatewayClassName"):
            errs.append("spec.upgradeStrategy.clusterUpgradeOptions.gatewayClassName: required for incremental upgrade")
        if opts.get("stepSizePercent", 0) > opts.get("maxSurgePercent", 100):
            errs.append("spec.upgradeStrategy.clusterUpgradeOptions: stepSizePercent exceeds maxSurgePercent")
        if opts.get("intervalSeconds", 0) <= 0:
            errs.append("spec.upgradeStrategy.clusterUpgradeOptions.intervalSeconds: must be > 0")
    head = rcc.get("headGroupSpec", {})
    if (head.get("headService") or {}).get("metadata", {}).get("name"):
        errs.append("spec.rayClusterConfig.headGroupSpec.headService.metadata.name: must not be set "
                    "(KubeRay >= 1.3 rejects it on RayService)")
    head_containers = head.get("template", {}).get("spec", {}).get("containers", [])
    if head_containers:
        ports = [p.get("name") for p in head_containers[0].get("ports", [])]
        if ports and "serve" not in ports:
            errs.append("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.ports: declares ports "
                        f"{ports} but none named 'serve'; KubeRay cannot build <name>-serve-svc")
    v2 = (rcc.get("autoscalerOptions") or {}).get("version") == "v2"
    names = [g.get("groupName") for g in rcc.get("workerGroupSpecs", [])]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        errs.append(f"spec.rayClusterConfig.workerGroupSpecs: duplicate groupName(s) {dup}")
    for where, group in _groups(spec):
        errs += _group_rules(where, group, v2, where.endswith("headGroupSpec"))
    return errs


def _group_rules(where: str, group: dict[str, Any], v2: bool, is_head: bool) -> list[str]:
    errs: list[str] = []
    if not is_head:
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2147483647)
        n = group.get("replicas")
        if not all(isinstance(v, int) for v in (lo, hi, 0 if n is None else n)):
            return errs  # wrong types: the schema check reports them
        if lo < 0 or lo > hi:
            errs.append(f"{where}: minReplicas ({lo}) must be >= 0 and <= maxReplicas ({hi})")
        if n is not None and not lo <= n <= hi:
            errs.append(f"{where}.replicas: {n} is outside [minReplicas {lo}, maxReplicas {hi}]")
    restart = group.get("template", {}).get("spec", {}).get("restartPolicy")
    if v2 and restart not in (None, "Never"):
        errs.append(f"{where}.template.spec.restartPolicy: autoscaler v2 needs Never or unset, got {restart!r}")
    params, resources = group.get("rayStartParams", {}), group.get("resources") or {}
    for key in _INT_START_PARAMS:
        if key in params and not str(params[key]).isdigit():
            errs.append(f"{where}.rayStartParams[{key}]: `ray start --{key}` takes an integer, got {params[key]!r}")
    for param, res in _START_PARAM_RESOURCES.items():
        if param in params and res in resources:
            errs.append(f"{where}: {res} is set both in rayStartParams[{param}] and resources")
    if "resources" in params and resources:
        errs.append(f"{where}: custom resources are set both in rayStartParams[resources] and resources")
    return errs


def _unknown(where: str, obj: Any, model: type) -> list[str]:
    if not isinstance(obj, dict):
        return []
    fields = model.model_fields
    allowed = set(fields) | {f.alias for f in fields.values() if f.alias}
    return [f"{where}: unknown key {k!r} (not a field of {model.__name__})" for k in obj if k not in allowed]


def _walk_deployment_options(where: str, dep: Any) -> list[str]:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import RayActorOptionsSchema

    if not isinstance(dep, dict):
        return []
    return (_unknown(f"{where}.autoscaling_config", dep.get("autoscaling_config"), AutoscalingConfig)
            + _unknown(f"{where}.ray_actor_options", dep.get("ray_actor_options"), RayActorOptionsSchema))


def serve_config_rules(text: Any) -> tuple[list[str], list[AppConfig]]:
    """Check serveConfigV2 strictly; return (errors, the AppConfigs of kvserve applications)."""
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    where = "spec.serveConfigV2"
    if not isinstance(text, str):
        return [f"{where}: must be a YAML string, got {type(text).__name__}"], []
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f"{where}: not valid YAML: {err}"], []
    if not isinstance(doc, dict):
        return [f"{where}: must be a mapping with an applications list"], []
    errs = _unknown(where, doc, ServeDeploySchema) + _unknown(f"{where}.http_options", doc.get("http_options"),
                                                              HTTPOptionsSchema)
    try:
        ServeDeploySchema.model_validate(doc)
    except ValidationError as err:
        errs += [f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
    apps: list[AppConfig] = []
    for i, app in enumerate(doc.get("applications") or []):
        aw = f"{where}.applications.{i}"
        errs += _unknown(aw, app, ServeApplicationSchema)
        for j, dep in enumerate(app.get("deployments") or []):
            errs += _unknown(f"{aw}.deployments.{j}", dep, DeploymentSchema)
            errs += _walk_deployment_options(f"{aw}.deployments.{j}", dep)
        if app.get("import_path") == BUILDER:
            args = app.get("args") or {}
            for k, m in enumerate(args.get("models") or []):
                errs += _walk_deployment_options(f"{aw}.args.models.{k}.deployment", (m or {}).get("deployment"))
            errs += _walk_deployment_options(f"{aw}.args.ingress.deployment",
                                             (args.get("ingress") or {}).get("deployment"))
            try:
                apps.append(load_app_config(args, where=f"{aw}.args."))
            except ConfigError as err:
                errs.append(str(err).replace("invalid config:\n  ", "").replace("\n  ", "; "))
    return errs, apps


def karpenter_rules(doc: dict[str, Any]) -> list[str]:
    """Karpenter CEL rules that matter for these manifests (not evaluated by the schema check)."""
    errs: list[str] = []
    spec = doc.get("spec", {})
    if doc.get("kind") == "EC2NodeClass" and ("role" in spec) == ("instanceProfile" in spec):
        errs.append("spec: must specify exactly one of ['role', 'instanceProfile']")
    if doc.get("kind") == "EC2NodeClass":
        aliases = [t["alias"] for t in spec.get("amiSelectorTerms", []) if isinstance(t, dict) and "alias" in t]
        if aliases and len(spec.get("amiSelectorTerms", [])) > 1:
            errs.append("spec.amiSelectorTerms: an 'alias' term must be the only term")
    return errs
