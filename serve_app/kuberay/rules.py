"""Rules the CRD schemas do not express for one document: KubeRay operator validation, pod-spec rules
the API server applies to the pods the operator creates, and the Karpenter CEL rules that matter here.

Owns: ``rayservice_rules`` and ``karpenter_rules``. ``rayservice_rules`` reimplements KubeRay's
``ray-operator/controllers/ray/utils/validation.go`` (read at 1.5-1.7): name <= 47 chars and
DNS-1035; ``ray.io/initializing-timeout`` a positive Go duration or integer of seconds;
upgradeStrategy values and incremental-upgrade prerequisites; no headService name; 0 <= minReplicas <=
maxReplicas; autoscaler v2 restartPolicy; a group with a non-empty ``resources`` map sets none of
num-cpus/num-gpus/memory/resources in rayStartParams; no ``labels`` in rayStartParams. It adds what
would only fail later: integer rayStartParams (``ray start`` crash-loops on a fraction), parseable
``resources`` quantities (the operator skips others), head ports naming ``serve``, extended resources
with request == limit (the API server rejects the pod, not the RayService), and, as a lint the
operator does not enforce, ``replicas`` inside [minReplicas, maxReplicas].
A negative ``rayClusterDeletionDelaySeconds`` is left to the CRD schema (``minimum: 0``).
The serveConfigV2 rules live in rules_serve.py. Each function returns "path: problem" messages.
"""

from __future__ import annotations

import re
from typing import Any

from serve_app.kuberay.units import go_duration_s, quantity

DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_RAYSERVICE_NAME = 47
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
INITIALIZING_TIMEOUT = "ray.io/initializing-timeout"
#: rayStartParams that declare Ray resources; KubeRay rejects any of them next to a non-empty group
#: ``resources`` map, which it turns into these flags itself (CPU -> num-cpus, GPU -> num-gpus, ...).
RESOURCE_START_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
#: rayStartParams that `ray start` parses as integers (a fraction makes the pod crash-loop).
_INT_START_PARAMS = ("num-cpus", "num-gpus", "memory", "object-store-memory", "metrics-export-port")
_MAX_INT32 = 2147483647


def groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(field path, group spec) of the head group and every worker group of a RayService spec."""
    rcc = spec.get("rayClusterConfig", {})
    out = [("spec.rayClusterConfig.headGroupSpec", rcc.get("headGroupSpec", {}))]
    out += [(f"spec.rayClusterConfig.workerGroupSpecs.{i}", g) for i, g in enumerate(rcc.get("workerGroupSpecs", []))]
    return out


def rayservice_rules(doc: dict[str, Any]) -> list[str]:
    """KubeRay operator checks of a RayService (those the API server would let through)."""
    meta = doc.get("metadata", {})
    name = meta.get("name", "")
    errs: list[str] = []
    if len(name) > MAX_RAYSERVICE_NAME:
        errs.append(f"metadata.name: {name!r} is {len(name)} characters; KubeRay allows at most "
                    f"{MAX_RAYSERVICE_NAME} (it derives <name>-serve-svc and RayCluster names from it)")
    if not DNS1035.fullmatch(name):
        errs.append(f"metadata.name: {name!r} is not a DNS-1035 label")
    errs += _initializing_timeout((meta.get("annotations") or {}).get(INITIALIZING_TIMEOUT))
    spec = doc.get("spec", {})
    rcc = spec.get("rayClusterConfig", {})
    errs += _upgrade_rules(spec.get("upgradeStrategy") or {}, rcc)
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
    for where, group in groups(spec):
        is_head = where.endswith("headGroupSpec")
        errs += ([] if is_head else _replica_rules(where, group)) + _group_rules(where, group, v2)
        errs += _extended_resource_rules(where, group.get("template", {}).get("spec", {}))
    return errs


def _initializing_timeout(value: Any) -> list[str]:
    """KubeRay parses the annotation as a Go duration, else as integer seconds; either must be > 0."""
    where = f"metadata.annotations[{INITIALIZING_TIMEOUT}]"
    if value is None or value == "":
        return []  # unset: no timeout (the operator treats an empty value the same way)
    if not isinstance(value, str):
        return [f"{where}: annotation values must be strings, got {type(value).__name__} {value!r}"]
    try:
        seconds = go_duration_s(value)
    except ValueError:
        if not re.fullmatch(r"[+-]?\d+", value):
            return [(f"{where}: {value!r} is neither a Go duration (e.g. '45m', '1h30m', '300s') nor an integer "
                     "number of seconds; KubeRay rejects the RayService")]
        seconds = int(value)
    if seconds <= 0:
        return [f"{where}: {value!r} is not positive; KubeRay rejects the RayService (use e.g. '45m')"]
    return []


def _upgrade_rules(upgrade: dict[str, Any], rcc: dict[str, Any]) -> list[str]:
    utype = upgrade.get("type")
    if utype is not None and utype not in UPGRADE_TYPES:
        return [f"spec.upgradeStrategy.type: {utype!r} is not one of {list(UPGRADE_TYPES)}"]
    if utype != "NewClusterWithIncrementalUpgrade":
        return []
    errs = []
    opts = upgrade.get("clusterUpgradeOptions") or {}
    if not rcc.get("enableInTreeAutoscaling"):
        errs.append("spec.upgradeStrategy: NewClusterWithIncrementalUpgrade needs enableInTreeAutoscaling")
    if not opts.get("gatewayClassName"):
        errs.append("spec.upgradeStrategy.clusterUpgradeOptions.gatewayClassName: required for incremental upgrade")
    if opts.get("stepSizePercent", 0) > opts.get("maxSurgePercent", 100):
        errs.append("spec.upgradeStrategy.clusterUpgradeOptions: stepSizePercent exceeds maxSurgePercent")
    if opts.get("intervalSeconds", 0) <= 0:
        errs.append("spec.upgradeStrategy.clusterUpgradeOptions.intervalSeconds: must be > 0")
    return errs


def _replica_rules(where: str, group: dict[str, Any]) -> list[str]:
    lo, hi, n = group.get("minReplicas", 0), group.get("maxReplicas", _MAX_INT32), group.get("replicas")
    if not all(isinstance(v, int) for v in (lo, hi, 0 if n is None else n)):
        return []  # wrong types: the schema check reports them
    if lo < 0 or lo > hi:
        return [f"{where}: minReplicas ({lo}) must be >= 0 and <= maxReplicas ({hi})"]
    if n is not None and not lo <= n <= hi:
        # KubeRay does not reject this: it clamps the desired pods to [minReplicas, maxReplicas]
        # (GetWorkerGroupDesiredReplicas), and the autoscaler owns `replicas` from then on.
        return [(f"{where}.replicas: {n} is outside [minReplicas {lo}, maxReplicas {hi}] (lint, not an operator "
                 f"rejection: KubeRay clamps it and starts {min(max(n, lo), hi)} pods; write that value instead)")]
    return []


def _group_rules(where: str, group: dict[str, Any], v2: bool) -> list[str]:
    errs: list[str] = []
    restart = group.get("template", {}).get("spec", {}).get("restartPolicy")
    if v2 and restart not in (None, "Never"):
        errs.append(f"{where}.template.spec.restartPolicy: autoscaler v2 needs Never or unset, got {restart!r}")
    params, resources = group.get("rayStartParams") or {}, group.get("resources") or {}
    for key in _INT_START_PARAMS:
        if key in params and not str(params[key]).isdigit():
            errs.append(f"{where}.rayStartParams[{key}]: `ray start --{key}` takes an integer, got {params[key]!r}")
    if "labels" in params:
        errs.append(f"{where}.rayStartParams[labels]: KubeRay rejects it; use the group's top-level labels field")
    both = [k for k in RESOURCE_START_PARAMS if params.get(k) not in (None, "")]
    if resources and both:
        errs.append(f"{where}.rayStartParams: sets {both} while {where}.resources is non-empty "
                    f"({sorted(resources)}); KubeRay rejects a group that declares Ray resources in both places. "
                    "Move them into resources (CPU becomes --num-cpus, GPU --num-gpus, memory --memory, "
                    "any other key --resources)")
    for key, value in resources.items():
        try:
            quantity(value)
        except ValueError:
            errs.append(f"{where}.resources[{key}]: {value!r} is not a Kubernetes quantity; KubeRay would "
                        "silently drop it from `ray start`")
    return errs


def _extended_resource_rules(where: str, pod: dict[str, Any]) -> list[str]:
    """Extended resources (``nvidia.com/gpu``...) cannot be overcommitted: request must equal limit."""
    errs = []
    for field in ("initContainers", "containers"):
        for i, c in enumerate(pod.get(field) or []):
            res = c.get("resources") or {}
            requests, limits = res.get("requests") or {}, res.get("limits") or {}
            for key in sorted({k for k in {**requests, **limits} if "/" in k and not k.startswith("kubernetes.io/")}):
                path = f"{where}.template.spec.{field}.{i}.resources"
                if key in requests and key not in limits:
                    errs.append(f"{path}: requests {key} without a limit; Kubernetes rejects the pod (an extended "
                                "resource needs a limit, and the request defaults to it)")
                elif key in requests and _differ(requests[key], limits[key]):
                    errs.append(f"{path}: requests {key}={requests[key]} but limits {key}={limits[key]}; Kubernetes "
                                "rejects the pod (an extended resource's request must equal its limit)")
    return errs


def _differ(a: Any, b: Any) -> bool:
    try:
        return quantity(a) != quantity(b)
    except ValueError:
        return str(a) != str(b)


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
