"""Checks across documents: what only holds when the whole set of manifests is read together.

Owns: ``cross_check(docs, apps_by_service, ray_version)``. For every RayService:
  - the ingress fits a CPU worker group; each GPU model's tensor_parallel_size equals
    ``nvidia.com/gpu`` of a worker group declaring its ``accelerator_type:<X>`` resource (STRICT_PACK
    puts all TP bundles of a replica on one pod), that group's Ray CPUs cover the replica's bundles, and
    its maxReplicas covers the model's Serve max_replicas. A group's Ray CPUs are read the way KubeRay
    starts Ray: ``resources.CPU``, else rayStartParams ``num-cpus``, else the container's CPU limit;
  - PYTHONHASHSEED on every Ray container equals ``routing.hash_seed``, or comes from a Secret when the
    applications read it from the environment (``routing.hash_seed_from_env``);
  - Ray token authentication is on (``authOptions.mode: token``, Ray >= 2.52) and a NetworkPolicy of the
    namespace selects every pod template (otherwise any pod in the cluster reaches the GCS, the dashboard
    and the KV-event sockets);
  - terminationGracePeriodSeconds >= the longest graceful_shutdown_timeout_s;
  - object-store-memory fits /dev/shm, which fits the container memory limit, and every node's object
    store lets the KV tier have its budget (the tier caps it by the smallest store in the cluster);
  - rayVersion matches the image tag's ``ray<X.Y.Z>`` and the Dockerfile; <name>-serve-svc <= 63 chars;
  - the PVCs, ServiceAccounts, Secrets and ConfigMaps (and their keys) its pods name exist, unless the
    reference is ``optional``; the NodePool each group selects exists, the group tolerates its taints
    (key, value, effect, as the scheduler matches them), its GPU limit covers maxReplicas x GPUs, and
    consolidateAfter >= every downscale_delay_s (the reference and toleration logic is references.py).
For every PodMonitor: it selects at least one Ray pod template and each scraped port name is
declared on that pod's container. PersistentVolume claimRefs and PVC volumeNames agree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from serve_app.config import AppConfig
from serve_app.kuberay.rayservice import longest_graceful_s
from serve_app.kuberay.references import check_references, check_toleration
from serve_app.kuberay.units import duration_s, quantity, quantity_bytes

#: Labels KubeRay puts on every pod it creates, by group kind.
OPERATOR_LABELS = {"head": {"ray.io/node-type": "head", "ray.io/is-ray-node": "yes"},
                   "worker": {"ray.io/node-type": "worker", "ray.io/is-ray-node": "yes"}}


def _pods(rs: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(where, node type, group spec, pod template) of a RayService's head and worker groups."""
    rcc = rs["spec"].get("rayClusterConfig", {})
    out = [("headGroupSpec", "head", rcc.get("headGroupSpec", {}), rcc.get("headGroupSpec", {}).get("template", {}))]
    out += [(f"workerGroupSpecs[{g.get('groupName')}]", "worker", g, g.get("template", {}))
            for g in rcc.get("workerGroupSpecs", [])]
    return out


def _max_pods(group: dict[str, Any]) -> int:
    value = group.get("maxReplicas", 2147483647)
    return value if isinstance(value, int) else 0  # a wrong type is the schema check's to report


def _container(tpl: dict[str, Any]) -> dict[str, Any]:
    return (tpl.get("spec", {}).get("containers") or [{}])[0]


def _gpus(tpl: dict[str, Any]) -> int:
    return int(_container(tpl).get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def ray_cpus(group: dict[str, Any], tpl: dict[str, Any]) -> float:
    """CPUs KubeRay passes to ``ray start --num-cpus`` for a group.

    ``resources.CPU`` (any case) wins, rounded up as the operator does; else rayStartParams ``num-cpus``;
    else the container's CPU limit, rounded up. The operator rejects a group setting both of the first two.
    """
    value = next((v for k, v in (group.get("resources") or {}).items() if k.lower() == "cpu"), None)
    if value is not None:
        return float(math.ceil(quantity(value)))
    value = (group.get("rayStartParams") or {}).get("num-cpus")
    if value is not None:
        return float(value)
    return float(math.ceil(quantity(_container(tpl).get("resources", {}).get("limits", {}).get("cpu", 0))))


def _replica_cpus(model: Any) -> tuple[float, str]:
    """Ray CPUs one pod must offer a model replica: all bundles under STRICT_PACK, else the largest."""
    from deployments.vllm_replica import placement_bundles

    bundles, strategy = placement_bundles(model)
    cpus = [b.get("CPU", 0.0) for b in bundles]
    return (sum(cpus) if strategy == "STRICT_PACK" else max(cpus)), strategy


def _check_models(name: str, rs: dict[str, Any], apps: list[AppConfig]) -> list[str]:
    errs: list[str] = []
    workers = [(g, t) for _, kind, g, t in _pods(rs) if kind == "worker"]
    cpu_groups = {g.get("groupName"): ray_cpus(g, t) for g, t in workers if not _gpus(t)}
    for app in apps:
        need = float(app.ingress.deployment.ray_actor_options.get("num_cpus", 1))
        if not any(c >= need for c in cpu_groups.values()):
            errs.append(f"ingress needs {need} CPUs per replica but no CPU worker group offers that "
                        f"(Ray CPUs {cpu_groups}; the head advertises num-cpus 0)")
        for m in app.models:
            gpus = float(m.deployment.ray_actor_options.get("num_gpus", 0) or 0)
            if gpus <= 0:
                continue
            acc = f"accelerator_type:{m.accelerator_type}" if m.accelerator_type else None
            fits = [(g, t) for g, t in workers if _gpus(t) == m.tensor_parallel_size
                    and (acc is None or acc in (g.get("resources") or {}))]
            if not fits:
                shapes = {g.get("groupName"): _gpus(t) for g, t in workers}
                errs.append(f"model {m.id}: tensor_parallel_size {m.tensor_parallel_size} (STRICT_PACK, "
                            f"accelerator {m.accelerator_type}) matches no worker group's nvidia.com/gpu "
                            f"limit {shapes}")
                continue
            cpus, strategy = _replica_cpus(m)
            offers = {g.get("groupName"): ray_cpus(g, t) for g, t in fits}
            if not any(c >= cpus for c in offers.values()):
                errs.append(f"model {m.id}: a replica's placement bundles need {cpus:g} Ray CPUs on one pod "
                            f"({strategy}) but worker group(s) offer {offers} (resources.CPU, else rayStartParams "
                            "num-cpus, else the CPU limit); the replica would never be placed")
            most = m.deployment.replica_bounds()[1]
            need = math.ceil(most * gpus)
            pods = sum(_max_pods(g) for g, _ in fits)
            if pods < need:
                errs.append(f"model {m.id}: Serve may run {most} replicas but worker group(s) "
                            f"{[g.get('groupName') for g, _ in fits]} allow only {pods} pods")
    return errs


def _check_pods(name: str, rs: dict[str, Any], apps: list[AppConfig], index: dict, ray_version: str | None
                ) -> list[str]:
    errs: list[str] = []
    ns = rs["metadata"].get("namespace", "default")
    from_secret = any(a.routing.hash_seed_from_env for a in apps)
    seeds = {a.routing.hash_seed for a in apps} if not from_secret else set()
    graceful = longest_graceful_s(apps)
    delays = [float((m.deployment.autoscaling_config or {}).get("downscale_delay_s", 600.0))
              for a in apps for m in a.models if m.deployment.autoscaling_config is not None]
    rv = rs["spec"].get("rayClusterConfig", {}).get("rayVersion")
    if ray_version and rv != ray_version:
        errs.append(f"rayVersion {rv} does not match the serving image's RAY_VERSION {ray_version} "
                    "(kuberay/Dockerfile)")
    for where, _, group, tpl in _pods(rs):
        spec, c = tpl.get("spec", {}), _container(tpl)
        env = {e.get("name"): e.get("value") for e in c.get("env", [])}
        seed_ref = next((e.get("valueFrom", {}).get("secretKeyRef") for e in c.get("env", [])
                         if e.get("name") == "PYTHONHASHSEED"), None)
        if from_secret and not seed_ref:
            errs.append(f"{where}: routing.hash_seed_from_env is true but PYTHONHASHSEED does not come from a Secret "
                        "(env[PYTHONHASHSEED].valueFrom.secretKeyRef)")
        if seeds and env.get("PYTHONHASHSEED") not in seeds:
            errs.append(f"{where}: PYTHONHASHSEED={env.get('PYTHONHASHSEED')!r}, routing.hash_seed is "
                        f"{sorted(seeds)} (block hashes would differ across replicas)")
        tag = re.search(r"ray(\d+\.\d+\.\d+)", c.get("image", "").rsplit(":", 1)[-1])
        if tag and tag.group(1) != rv:
            errs.append(f"{where}: image {c['image']} is built on Ray {tag.group(1)} but rayVersion is {rv}")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace < graceful:
            errs.append(f"{where}: terminationGracePeriodSeconds {grace} < graceful_shutdown_timeout_s {graceful}")
        errs += _check_memory(where, group, spec, c) + check_references(where, spec, ns, index)
        pool_name = spec.get("nodeSelector", {}).get("karpenter.sh/nodepool")
        if pool_name:
            errs += _check_pool(where, pool_name, spec, group, tpl, delays, index)
    return errs


def _check_kv_tier(rs: dict[str, Any], apps: list[AppConfig]) -> list[str]:
    errs = []
    for tier in (a.kv_tier for a in apps if a.kv_tier.enabled):
        for where, _, group, _ in _pods(rs):
            store = int(group.get("rayStartParams", {}).get("object-store-memory", 0))
            if store and store * tier.max_object_store_fraction < tier.budget_bytes:
                errs.append(f"{where}: kv_tier.budget_gib {tier.budget_gib} is capped to "
                            f"{store * tier.max_object_store_fraction / 2**30:.1f} GiB by this node's object store "
                            f"({store / 2**30:.1f} GiB x max_object_store_fraction {tier.max_object_store_fraction})")
    return errs


def _check_memory(where: str, group: dict[str, Any], spec: dict[str, Any], c: dict[str, Any]) -> list[str]:
    shm = next((v for v in spec.get("volumes", []) if any(
        m.get("name") == v.get("name") and m.get("mountPath") == "/dev/shm" for m in c.get("volumeMounts", []))), None)
    store = group.get("rayStartParams", {}).get("object-store-memory")
    limit = c.get("resources", {}).get("limits", {}).get("memory")
    if shm is None or "sizeLimit" not in shm.get("emptyDir", {}):
        return [f"{where}: /dev/shm is not a sized emptyDir (the object store, and the KV tier in it, lives there)"]
    shm_b = quantity_bytes(shm["emptyDir"]["sizeLimit"])
    errs = []
    if shm["emptyDir"].get("medium") != "Memory":
        errs.append(f"{where}: /dev/shm emptyDir must have medium Memory")
    if store is not None and int(store) > shm_b:
        errs.append(f"{where}: object-store-memory {store} exceeds /dev/shm sizeLimit {shm['emptyDir']['sizeLimit']}")
    if limit is not None and shm_b >= quantity_bytes(limit):
        errs.append(f"{where}: /dev/shm {shm['emptyDir']['sizeLimit']} leaves nothing of memory limit {limit}")
    return errs


def _check_pool(where: str, pool_name: str, spec: dict[str, Any], group: dict[str, Any], tpl: dict[str, Any],
                delays: list[float], index: dict) -> list[str]:
    pool = index.get(("NodePool", "", pool_name))
    if pool is None:
        return [f"{where}: NodePool {pool_name} is not among the documents"]
    errs = []
    pspec = pool["spec"]
    for taint in pspec.get("template", {}).get("spec", {}).get("taints", []):
        errs += check_toleration(where, spec.get("tolerations") or [], taint, f"NodePool {pool_name}")
    gpus = _gpus(tpl)
    limit = pspec.get("limits", {}).get("nvidia.com/gpu")
    if gpus and limit is not None and int(limit) < gpus * _max_pods(group):
        errs.append(f"{where}: maxReplicas {_max_pods(group)} x {gpus} GPUs exceeds NodePool "
                    f"{pool_name} limit nvidia.com/gpu={limit}")
    after = pspec.get("disruption", {}).get("consolidateAfter", "0s")
    if gpus and delays and duration_s(after) < max(delays):
        errs.append(f"NodePool {pool_name}: consolidateAfter {after} < Serve downscale_delay_s {max(delays)}")
    return errs


def _check_monitor(pm: dict[str, Any], services: list[dict[str, Any]]) -> list[str]:
    sel = pm["spec"].get("selector", {}).get("matchLabels", {})
    namespaces = pm["spec"].get("namespaceSelector", {}).get("matchNames")
    matched = 0
    errs = []
    for rs in services:
        if namespaces and rs["metadata"].get("namespace", "default") not in namespaces:
            continue
        for where, kind, _, tpl in _pods(rs):
            labels = {**tpl.get("metadata", {}).get("labels", {}), **OPERATOR_LABELS[kind]}
            if any(labels.get(k) != v for k, v in sel.items()):
                continue
            matched += 1
            ports = {p.get("name") for p in _container(tpl).get("ports", [])}
            for ep in pm["spec"].get("podMetricsEndpoints", []):
                if ep.get("port") and ep["port"] not in ports:
                    errs.append(f"port {ep['port']!r} is not declared on {rs['metadata']['name']} {where} "
                                f"(ports {sorted(ports)})")
    if services and not matched:
        errs.append(f"selector {sel} matches no Ray pod of the RayServices")
    return errs


def _check_surface(rs: dict[str, Any], policies: list[dict[str, Any]]) -> list[str]:
    """Ray token authentication on, and every pod template selected by an Ingress NetworkPolicy."""
    errs = []
    cfg = rs["spec"].get("rayClusterConfig", {})
    mode = (cfg.get("authOptions") or {}).get("mode", "disabled")
    if mode != "token":
        errs.append(f"rayClusterConfig.authOptions.mode is {mode!r}: the GCS, dashboard and agents accept "
                    "unauthenticated calls (set mode: token)")
    elif tuple(int(x) for x in re.findall(r"\d+", str(cfg.get("rayVersion", "0")))[:2]) < (2, 52):
        errs.append(f"rayClusterConfig.authOptions.mode token needs rayVersion >= 2.52, got {cfg.get('rayVersion')}")
    ns = rs["metadata"].get("namespace", "default")
    mine = [p for p in policies if p["metadata"].get("namespace", "default") == ns
            and "Ingress" in (p["spec"].get("policyTypes") or ["Ingress"])]
    for where, _, _, tpl in _pods(rs):
        labels = tpl.get("metadata", {}).get("labels", {})
        if not any(_selects(p["spec"].get("podSelector") or {}, labels) for p in mine):
            errs.append(f"{where}: no NetworkPolicy in namespace {ns} selects these pods (labels {labels}): every "
                        "pod in the cluster could reach the GCS (6379), dashboard (8265), client (10001) and KV-event "
                        "ports")
    return errs


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels only; matchExpressions are not rendered) selects these labels."""
    if selector.get("matchExpressions"):
        return False
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _guarded(check: Callable[..., list[str]], *args: Any) -> list[str]:
    """Run one check; a malformed document (already reported by the schema check) cannot crash it."""
    try:
        return check(*args)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        return [f"cannot cross-check ({type(err).__name__}: {err}); fix the schema errors first"]


def cross_check(docs: list[dict[str, Any]], apps_by_service: dict[str, list[AppConfig]],
                ray_version: str | None = None) -> list[tuple[dict[str, Any], str]]:
    """(document, message) for every cross-document problem."""
    index = {(d.get("kind"), d.get("metadata", {}).get("namespace", "") if d.get("kind") in _NAMESPACED else "",
              d.get("metadata", {}).get("name")): d for d in docs}
    services = [d for d in docs if d.get("kind") == "RayService"]
    out: list[tuple[dict[str, Any], str]] = []
    for rs in services:
        name = rs["metadata"].get("name", "")
        if len(f"{name}-serve-svc") > 63:
            out.append((rs, f"service name {name}-serve-svc exceeds 63 characters"))
        apps = apps_by_service.get(name, [])
        msgs = (_guarded(_check_models, name, rs, apps) + _guarded(_check_kv_tier, rs, apps)
                + _guarded(_check_pods, name, rs, apps, index, ray_version)
                + _guarded(_check_surface, rs, [d for d in docs if d.get("kind") == "NetworkPolicy"]))
        out += [(rs, msg) for msg in msgs]
    for pm in (d for d in docs if d.get("kind") == "PodMonitor"):
        out += [(pm, msg) for msg in _guarded(_check_monitor, pm, services)]
    for pv in (d for d in docs if d.get("kind") == "PersistentVolume"):
        ref = pv["spec"].get("claimRef") or {}
        pvc = index.get(("PersistentVolumeClaim", ref.get("namespace"), ref.get("name")))
        if ref and (pvc is None or pvc["spec"].get("volumeName") != pv["metadata"]["name"]):
            out.append((pv, f"claimRef {ref.get('namespace')}/{ref.get('name')} has no PVC bound to this volume"))
    for np_ in (d for d in docs if d.get("kind") == "NodePool"):
        ref = np_["spec"].get("template", {}).get("spec", {}).get("nodeClassRef", {})
        if ("EC2NodeClass", "", ref.get("name")) not in index:
            out.append((np_, f"nodeClassRef EC2NodeClass {ref.get('name')} is not among the documents"))
    return out


#: Kinds whose identity includes a namespace (everything else here is cluster-scoped).
_NAMESPACED = {"RayService", "PersistentVolumeClaim", "ServiceAccount", "ConfigMap", "PodMonitor", "Secret",
               "Service"}
