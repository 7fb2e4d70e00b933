"""RayService (ray.io/v1) and the core objects it needs, built from one target and its Serve config.

Owns: ``build_target`` (a target's RayService) and ``build_common`` (Namespace, and the S3 model
store's ServiceAccount, PersistentVolume and PersistentVolumeClaim shared by all targets).
Everything that can be derived from the Serve config is derived, never restated:
  - one GPU worker group per (accelerator_type, tensor_parallel_size); each pod has
    ``nvidia.com/gpu`` = TP, because the replica's TP bundles are STRICT_PACKed onto one node;
  - min/maxReplicas from the models' Serve ``autoscaling_config`` (or ``num_replicas``);
  - ``resources: {"CPU": <replica CPUs>, "accelerator_type:<X>": "1"}`` so the autoscaler can scale such a
    group from zero (and no resource in rayStartParams: the operator rejects a group that has both);
  - ``PYTHONHASHSEED`` = ``routing.hash_seed`` on every pod (block hashes agree across replicas), or from
    the hash-seed Secret when ``routing.hash_seed_from_env``; the API-key Secret mounted at
    ``auth.api_keys_path``; Ray token authentication (``authOptions``) and the target's NetworkPolicy
    (serve_app/kuberay/network.py);
  - terminationGracePeriodSeconds, the workers' preStop drain (``kvserve drain``) and
    rayClusterDeletionDelaySeconds from the longest ``graceful_shutdown_timeout_s``, itself checked to
    cover ``ingress.request_timeout_s``, so in-flight generations finish on scale-down, node
    disruption and upgrades.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from serve_app import settings
from serve_app.config import AppConfig, ConfigError
from serve_app.kuberay.network import auth_options, build_network_policy, secret_env, secret_mounts, seed_from_secret
from serve_app.kuberay.rules_serve import unbounded_queues
from serve_app.kuberay.targets import ClusterSpec, Target, effective_serve_config

logger = logging.getLogger(__name__)

GIB = 1024**3
SERVE_PORT, METRICS_PORT = 8000, 8080
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": SERVE_PORT,
              "metrics": METRICS_PORT, "as-metrics": 44217, "dash-metrics": 44227}
WORKER_PORTS = {"serve": SERVE_PORT, "metrics": METRICS_PORT}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
#: extra room for NCCL and vLLM shared memory beyond the object store, in GiB.
SHM_HEADROOM_GIB = 2
PART_OF = "kvserve"


@dataclass
class GpuGroup:
    """One GPU worker group: all models of one accelerator type and TP size."""

    accelerator_type: str
    tp: int
    min_pods: int = 0
    max_pods: int = 0
    cpus: float = 0.0
    models: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"gpu-{self.accelerator_type.lower()}-tp{self.tp}"


def gpu_groups(apps: list[AppConfig], target: Target) -> list[GpuGroup]:
    """Worker groups needed by the models: pods hold exactly TP GPUs, one replica per pod."""
    groups: dict[tuple[str, int], GpuGroup] = {}
    for app in apps:
        for m in app.models:
            gpus = float(m.deployment.ray_actor_options.get("num_gpus", 0) or 0)
            if gpus <= 0:
                raise ConfigError(f"target {target.name}: model {m.id} needs ray_actor_options.num_gpus > 0 "
                                  "on a GPU target (set it in model_overrides)")
            if not m.accelerator_type:
                raise ConfigError(f"target {target.name}: model {m.id} needs accelerator_type on a GPU target "
                                  "(it picks the node pool and lets the autoscaler scale from zero)")
            g = groups.setdefault((m.accelerator_type, m.tensor_parallel_size),
                                  GpuGroup(m.accelerator_type, m.tensor_parallel_size))
            lo, hi = m.deployment.replica_bounds()
            g.min_pods += math.ceil(lo * gpus)
            g.max_pods += math.ceil(hi * gpus)
            per_pod = max(1, math.floor(1 / gpus)) if gpus < 1 else 1  # fractional GPUs share a pod
            g.cpus = max(g.cpus, per_pod * float(m.deployment.ray_actor_options.get("num_cpus", 1)))
            g.models.append(m.id)
    return sorted(groups.values(), key=lambda g: g.name)


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{int(value * 1000)}m"


def _container(name: str, target: Target, env: dict[str, str], ports: dict[str, int], cpu: float,
               memory_gib: int, gpus: int) -> dict[str, Any]:
    limits: dict[str, str] = {"cpu": _quantity(cpu), "memory": f"{memory_gib}Gi"}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return {
        "name": name,
        "image": target.image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports.items()],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": {"requests": dict(limits), "limits": dict(limits)},
        "volumeMounts": [],
    }


def _pod(target: Target, cluster: ClusterSpec, container: dict[str, Any], shm_gib: int, role: str,
         pool: str | None, gpu: bool, grace_s: int) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib}Gi"}},
        {"name": "cache", "emptyDir": {"sizeLimit": "100Gi"}},
    ]
    container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"},
                                 {"name": "cache", "mountPath": "/home/ray/.cache"}, *container["volumeMounts"]]
    if cluster.model_store is not None and target.model_dir is None:
        store = cluster.model_store
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": store.claim_name, "readOnly": True}})
        container["volumeMounts"].append({"name": "models", "mountPath": store.mount_path, "readOnly": True})
        spec_sa = {"serviceAccountName": cluster.service_account}  # IRSA / Pod Identity: S3 read
    else:
        spec_sa = {}
    spec: dict[str, Any] = {
        **spec_sa,
        "terminationGracePeriodSeconds": grace_s,
        "containers": [container],
        "volumes": volumes,
    }
    if target.karpenter and pool:
        spec["nodeSelector"] = {"karpenter.sh/nodepool": pool}
    if gpu:
        spec["tolerations"] = [dict(GPU_TOLERATION)]
    meta: dict[str, Any] = {"labels": {"app.kubernetes.io/name": PART_OF, "app.kubernetes.io/instance": target.name,
                                       "app.kubernetes.io/component": role}}
    if role == "head":
        meta["annotations"] = {"karpenter.sh/do-not-disrupt": "true"}
    return {"metadata": meta, "spec": spec}


def _env(target: Target, cluster: ClusterSpec, apps: list[AppConfig]) -> dict[str, str]:
    seeds = {a.routing.hash_seed for a in apps}
    if len(seeds) != 1:
        raise ConfigError(f"target {target.name}: applications disagree on routing.hash_seed {sorted(seeds)}")
    model_dir = target.model_dir or (cluster.model_store.mount_path if cluster.model_store else None)
    env = {**({} if seed_from_secret(apps) else {"PYTHONHASHSEED": seeds.pop()}), **settings.SERVE_FAST_PATH_ENV}
    if model_dir:
        env["KVSERVE_MODEL_DIR"] = model_dir
    return {**env, "HF_HUB_OFFLINE": "1", **target.extra_env}


def kv_tier_min_store_gib(apps: list[AppConfig]) -> int:
    """Smallest object store (GiB) any node may have so the KV tier gets its full budget.

    The tier caps its budget at ``max_object_store_fraction`` of the smallest object store among
    all alive nodes (head and CPU workers included), so those must be sized for it too.
    """
    tiers = [a.kv_tier for a in apps if a.kv_tier.enabled]
    return max((math.ceil(t.budget_gib / t.max_object_store_fraction) for t in tiers), default=0)


def graceful_waits(app: AppConfig) -> dict[str, float]:
    """graceful_shutdown_timeout_s of each deployment of an application, keyed by where it is set."""
    waits = {"ingress.deployment": app.ingress.deployment.graceful_shutdown_timeout_s}
    return waits | {f"models[{m.id}].deployment": m.deployment.graceful_shutdown_timeout_s for m in app.models}


def longest_graceful_s(apps: list[AppConfig]) -> float:
    """The longest graceful_shutdown_timeout_s of any deployment (0 without applications)."""
    return max((v for app in apps for v in graceful_waits(app).values()), default=0.0)


def shutdown_s(target: Target, apps: list[AppConfig]) -> int:
    """Seconds a deployment may wait for in-flight requests at shutdown, checked to cover the longest one.

    A request lives at most ``ingress.request_timeout_s``; a deployment that waits less than that on
    shutdown (scale-down, drain, upgrade) could cut a generation, so that is a ConfigError.
    """
    for app in apps:
        short = [f"{where}.graceful_shutdown_timeout_s={v:g}" for where, v in graceful_waits(app).items()
                 if v < app.ingress.request_timeout_s]
        if short:
            raise ConfigError(f"target {target.name}: {', '.join(short)} < ingress.request_timeout_s="
                              f"{app.ingress.request_timeout_s:g}: a generation still running at shutdown would be "
                              "cut; raise them (model_overrides / args_overrides) or lower request_timeout_s")
    return math.ceil(longest_graceful_s(apps))


def _pre_stop(container: dict[str, Any], deadline_s: int) -> dict[str, Any]:
    """Worker containers drain their Ray node before Kubernetes sends SIGTERM (serve_app/drain.py)."""
    container["lifecycle"] = {"preStop": {"exec": {"command": ["kvserve", "drain", "--deadline-s",
                                                               str(deadline_s)]}}}
    return container


def build_rayservice(target: Target, cluster: ClusterSpec, doc: dict[str, Any], apps: list[AppConfig],
                     ray_version: str) -> dict[str, Any]:
    """The RayService of one target (doc is its effective Serve config)."""
    env = _env(target, cluster, apps)
    groups = gpu_groups(apps, target) if target.gpu else []
    graceful = shutdown_s(target, apps)
    drain_s = graceful + 30  # Serve starts replacements, then stops this node's replicas gracefully
    grace_s = drain_s + 30  # the preStop drain counts against the pod's grace period
    tier_gib = kv_tier_min_store_gib(apps)
    head_store = max(2, tier_gib)
    head_c = _container("ray-head", target, env, HEAD_PORTS, target.head.cpu, target.head.memory_gib, 0)
    head = {
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                           "metrics-export-port": str(METRICS_PORT), "object-store-memory": str(head_store * GIB)},
        "template": _pod(target, cluster, head_c, head_store + 1, "head", cluster.cpu_pool.name, False, grace_s),
    }
    cpu_store = max(target.cpu_object_store_gib, tier_gib)
    cpu_c = _pre_stop(_container("ray-worker", target, env, WORKER_PORTS, target.cpu_workers.cpu,
                                 target.cpu_workers.memory_gib, 0), drain_s)
    workers = [{
        "groupName": "cpu",
        "minReplicas": target.cpu_workers_min,
        "maxReplicas": target.cpu_workers_max,
        "replicas": target.cpu_workers_min,
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT), "object-store-memory": str(cpu_store * GIB)},
        "template": _pod(target, cluster, cpu_c, cpu_store + SHM_HEADROOM_GIB, "worker", cluster.cpu_pool.name,
                         False, grace_s),
    }]
    for g in groups:
        pool = cluster.gpu_pool(g.accelerator_type)
        if pool is None:
            raise ConfigError(f"target {target.name}: no gpu_pools entry with accelerator_type "
                              f"{g.accelerator_type!r} (models {g.models})")
        if g.tp > pool.gpus_per_node:
            raise ConfigError(f"target {target.name}: models {g.models} need {g.tp} GPUs on one node (TP, "
                              f"STRICT_PACK) but pool {pool.name} has {pool.gpus_per_node} per node")
        store = pool.object_store_gib_per_gpu * g.tp
        c = _pre_stop(_container("ray-worker", target, env, WORKER_PORTS, pool.cpu_per_gpu * g.tp,
                                 pool.memory_gib_per_gpu * g.tp, g.tp), drain_s)
        workers.append({
            "groupName": g.name,
            "minReplicas": g.min_pods,
            "maxReplicas": g.max_pods,
            "replicas": g.min_pods,
            "rayStartParams": {"metrics-export-port": str(METRICS_PORT), "object-store-memory": str(store * GIB)},
            # Ray CPUs = the replica actor's CPUs: the ingress stays on the cpu group, and the pod's
            # remaining cores go to vLLM's own threads (tokenizer, detokenizer, scheduler). Declared
            # here, not as rayStartParams num-cpus: the operator rejects a group that sets resources in
            # both places, and maps CPU to `ray start --num-cpus` (an integer) itself.
            "resources": {"CPU": str(math.ceil(g.cpus)), f"accelerator_type:{g.accelerator_type}": "1"},
            "template": _pod(target, cluster, c, store + SHM_HEADROOM_GIB, "worker", pool.name, True, grace_s),
        })
    volumes, mounts = secret_mounts(apps, cluster.security)
    for tpl in [head["template"]] + [w["template"] for w in workers]:
        tpl["spec"]["volumes"] += volumes
        tpl["spec"]["containers"][0]["volumeMounts"] += mounts
        tpl["spec"]["containers"][0]["env"] += secret_env(apps, cluster.security)
    serve_yaml = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {
            "name": target.name,
            "namespace": cluster.namespace,
            "labels": {"app.kubernetes.io/name": PART_OF, "app.kubernetes.io/instance": target.name},
            "annotations": {"ray.io/initializing-timeout": target.initializing_timeout},
        },
        "spec": {
            "upgradeStrategy": {"type": target.upgrade_strategy},
            # Old cluster lives on after the traffic switch until its in-flight generations are done.
            "rayClusterDeletionDelaySeconds": graceful + 30,
            "serveConfigV2": serve_yaml,
            "rayClusterConfig": {
                "rayVersion": ray_version,
                "authOptions": auth_options(cluster.security),
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"version": "v2", "upscalingMode": "Default",
                                      "idleTimeoutSeconds": target.autoscaler_idle_timeout_s},
                "headGroupSpec": head,
                "workerGroupSpecs": workers,
            },
        },
    }


def build_common(cluster: ClusterSpec) -> list[dict[str, Any]]:
    """Shared by all targets: Namespace, and the model store's ServiceAccount, static Mountpoint PV and PVC."""
    ns = cluster.namespace
    labels = {"app.kubernetes.io/name": PART_OF}
    docs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}]
    store = cluster.model_store
    if store is None:
        return docs
    sa_meta: dict[str, Any] = {"name": cluster.service_account, "namespace": ns, "labels": labels}
    if cluster.service_account_annotations:
        sa_meta["annotations"] = dict(cluster.service_account_annotations)
    docs.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": sa_meta})
    opts = ["read-only", "allow-other", "uid=1000", "gid=100", f"region {store.region}"]
    if store.prefix:
        opts.append(f"prefix {store.prefix}")
    pv_name = f"{ns}-{store.claim_name}"
    docs.append({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": pv_name, "labels": labels},
        "spec": {
            "capacity": {"storage": "1Ti"},  # required by the API, ignored by Mountpoint
            "accessModes": ["ReadOnlyMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "claimRef": {"namespace": ns, "name": store.claim_name},
            "mountOptions": opts,
            "csi": {"driver": "s3.csi.aws.com", "volumeHandle": f"s3-csi-{pv_name}",
                    # Mountpoint signs S3 requests with the pod's ServiceAccount role, not the driver's.
                    "volumeAttributes": {"bucketName": store.bucket, "authenticationSource": "pod"}},
        },
    })
    docs.append({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": store.claim_name, "namespace": ns, "labels": labels},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv_name,
                 "resources": {"requests": {"storage": "1Ti"}}},
    })
    return docs


def build_target(target: Target, cluster: ClusterSpec, root: Path, ray_version: str) -> list[dict[str, Any]]:
    """The documents of one target's manifest file (its RayService and NetworkPolicy; shared objects are in
    build_common)."""
    doc, apps = effective_serve_config(target, root)
    unbounded = [msg for i, app in enumerate(apps) for msg in unbounded_queues(app, f"applications.{i}.args.")]
    if unbounded:
        raise ConfigError(f"target {target.name} ({target.serve_config}): " + "; ".join(unbounded))
    rs = build_rayservice(target, cluster, doc, apps, ray_version)
    logger.info("target %s: %d worker group(s) from %s", target.name,
                len(rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]), target.serve_config)
    return [rs, build_network_policy(target.name, cluster.namespace, cluster.security)]
