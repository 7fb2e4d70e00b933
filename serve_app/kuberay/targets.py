"""Deployment targets: which Serve config becomes which RayService, on which EKS cluster.

Owns: the schema of ``configs/eks/targets.yaml`` (``TargetsFile``: one ``ClusterSpec`` and a list of
``Target``), ``load_targets`` and ``effective_serve_config``, which turns a target's Serve config file
plus its ``model_overrides`` (an RFC 7386 merge patch per model id: ``null`` deletes a key) into the
document that becomes ``spec.serveConfigV2``. The result is re-validated with the project's own
``AppConfig``, so an override can never produce a config ``serve run`` would reject.

Invariants: everything Kubernetes-side that is not derived from the Serve config lives here, with a
description; nothing in the generator hard-codes a cluster name, bucket or image.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve_app.config import AppConfig, ConfigError, load_app_config, load_serve_config
from serve_app.kuberay.network import SecuritySpec

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
#: NVIDIA GPUs per EC2 instance type (AWS accelerated-computing specs), for the types the pools name.
_GPUS_PER_INSTANCE = {
    **{f"g6e.{s}": 1 for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g6e.12xlarge": 4, "g6e.24xlarge": 4, "g6e.48xlarge": 8,
    **{f"g6.{s}": 1 for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g6.12xlarge": 4, "g6.24xlarge": 4, "g6.48xlarge": 8,
    **{f"g5.{s}": 1 for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8,
    "p4d.24xlarge": 8, "p5.48xlarge": 8, "p5e.48xlarge": 8, "p5en.48xlarge": 8,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GpuPool(_Strict):
    """One Karpenter NodePool of one GPU type; pods of a worker group take ``TP`` GPUs each."""

    name: str = Field(description="NodePool name; pods select it with karpenter.sh/nodepool.")
    accelerator_type: str = Field(description="Ray accelerator type of these GPUs (L40S, L4, A10G, H100).")
    instance_types: list[str] = Field(min_length=1, description="EC2 instance types Karpenter may launch.")
    capacity_types: list[Literal["on-demand", "spot", "reserved"]] = Field(default=["on-demand"])
    gpu_limit: int = Field(ge=1, description="Upper bound on nvidia.com/gpu across the pool (cost guard).")
    cpu_per_gpu: float = Field(gt=0, description="Pod CPU request per GPU (leave room for daemonsets).")
    memory_gib_per_gpu: int = Field(ge=1, description="Pod memory per GPU in GiB (includes /dev/shm).")
    object_store_gib_per_gpu: int = Field(
        ge=1, description="Ray object store per GPU in GiB: the node's share of the KV tier, in /dev/shm."
    )
    gpus_per_node: int = Field(
        ge=1, description="GPUs of every instance type listed (karpenter.k8s.aws/instance-gpu-count): 1 keeps "
                          "TP=1 replicas on single-GPU nodes, so losing a node loses one replica."
    )

    @model_validator(mode="after")
    def _check_gpu_count(self) -> GpuPool:
        counts = {t: _GPUS_PER_INSTANCE[t] for t in self.instance_types if t in _GPUS_PER_INSTANCE}
        wrong = sorted(t for t, n in counts.items() if n != self.gpus_per_node)
        if wrong:
            raise ValueError(f"gpu pool {self.name}: {wrong} do not have gpus_per_node={self.gpus_per_node} GPUs "
                             f"({ {t: counts[t] for t in wrong} })")
        return self


class CpuPool(_Strict):
    """The NodePool for the head and the CPU worker group (ingress, router, KV-tier directory)."""

    name: str
    instance_categories: list[str] = Field(default=["m", "c", "r"])
    min_generation: int = Field(default=6, ge=1, description="Smallest instance generation (m6i, c7i...).")
    cpu_limit: int = Field(ge=1, description="Upper bound on vCPUs across the pool.")


class ModelStore(_Strict):
    """Model weights in S3, mounted read-only through the Mountpoint for Amazon S3 CSI driver."""

    bucket: str
    prefix: str = Field(default="", description="Key prefix inside the bucket, ending in '/' when set.")
    region: str
    mount_path: str = Field(default="/models", description="Mount path; KVSERVE_MODEL_DIR points here.")
    claim_name: str = Field(default="kvserve-models", description="PVC (and PV) name.")


class ClusterSpec(_Strict):
    """The EKS cluster: node pools, node class, namespace and the model store."""

    name: str = Field(description="EKS cluster name (karpenter.sh/discovery tag value).")
    namespace: str
    node_role: str = Field(description="IAM role of Karpenter-launched nodes.")
    service_account: str = Field(description="ServiceAccount of Ray pods that read the model store.")
    service_account_annotations: dict[str, str] = Field(
        default_factory=dict, description="e.g. eks.amazonaws.com/role-arn: the IRSA role with S3 read access."
    )
    root_volume_gib: int = Field(default=300, ge=50, description="gp3 root volume: image + compile caches.")
    consolidate_after_s: int = Field(
        ge=0, description="Karpenter consolidateAfter; must be >= every Serve downscale_delay_s."
    )
    node_expire_after: str = Field(
        default="720h", description="expireAfter of the GPU pools; the CPU pool (head) never expires, since "
                                    "replacing the head restarts the whole service (upgrade it with a new RayService "
                                    "cluster instead).")
    ami_alias: str = Field(
        default="bottlerocket@latest",
        description="EC2NodeClass amiSelectorTerms alias. Pin a version (bottlerocket@v1.N.M) in production: with "
                    "@latest every Bottlerocket release drifts, and so replaces, every node.")
    gpu_disruption_budget: str = Field(
        default="1", description="NodePool disruption budget of the GPU pools (nodes at once, or a percentage): "
                                 "drift and expiry replace GPU nodes one at a time.")
    node_termination_grace: str = Field(
        default="2h", description="NodePool terminationGracePeriod: bounds how long draining may block."
    )
    model_store: ModelStore | None = None
    monitor_labels: dict[str, str] = Field(
        default={"release": "kube-prometheus-stack"},
        description="Labels the Prometheus operator selects PodMonitors and dashboards by.",
    )
    cpu_pool: CpuPool
    gpu_pools: list[GpuPool] = Field(default_factory=list)
    security: SecuritySpec = Field(description="NetworkPolicy peers, Ray token authentication and the Secrets "
                                   "(API keys, hash seed) the pods read.")

    def gpu_pool(self, accelerator_type: str) -> GpuPool | None:
        """The GPU pool whose GPUs are of this Ray accelerator type."""
        return next((p for p in self.gpu_pools if p.accelerator_type == accelerator_type), None)


class PodSize(_Strict):
    """Container resources of one pod."""

    cpu: float = Field(gt=0)
    memory_gib: int = Field(ge=1)


class Target(_Strict):
    """One RayService rendered from one Serve config file."""

    name: str = Field(description="RayService name (<= 47 chars, DNS-1035): <name>-serve-svc is the endpoint.")
    file: str = Field(description="Output file under kuberay/.")
    serve_config: str = Field(description="Serve config file, relative to the repository root.")
    image: str = Field(description="Serving image (kuberay/Dockerfile); its Ray version is rayVersion.")
    model_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Merge patch (RFC 7386) per model id applied for this cluster."
    )
    args_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Merge patch applied to every application's args (kv_tier, routing, ingress); "
        "models are patched through model_overrides.",
    )
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        default="EveryNode",
        description="Serve proxies; EveryNode puts one on every pod, so <name>-serve-svc spreads over them.",
    )
    head: PodSize = Field(default=PodSize(cpu=4, memory_gib=16))
    cpu_workers: PodSize = Field(default=PodSize(cpu=8, memory_gib=32))
    cpu_workers_min: int = Field(default=1, ge=0)
    cpu_workers_max: int = Field(default=4, ge=1)
    cpu_object_store_gib: int = Field(default=4, ge=1)
    gpu: bool = Field(default=True, description="False for the CPU-only smoke test (models on CPU workers).")
    karpenter: bool = Field(default=True, description="Select Karpenter node pools (nodeSelector).")
    model_dir: str | None = Field(
        default=None, description="KVSERVE_MODEL_DIR when there is no model store (e.g. baked into the image)."
    )
    initializing_timeout: str = Field(default="45m", description="ray.io/initializing-timeout.")
    upgrade_strategy: Literal["NewCluster", "None"] = Field(
        default="NewCluster",
        description="RayService upgradeStrategy.type. NewClusterWithIncrementalUpgrade is not offered: it needs "
                    "clusterUpgradeOptions (Gateway API) that targets cannot express yet.")
    autoscaler_idle_timeout_s: int = Field(default=60, ge=0, description="Ray autoscaler idleTimeoutSeconds.")
    extra_env: dict[str, str] = Field(default_factory=dict, description="Env vars on every Ray container.")

    @field_validator("args_overrides")
    @classmethod
    def _check_args_overrides(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "models" in value:
            raise ValueError("patch models through model_overrides (keyed by model id), not args_overrides")
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if len(value) > 47 or not _DNS1035.fullmatch(value):
            raise ValueError(f"RayService name {value!r} must be DNS-1035 and at most 47 characters")
        return value


class TargetsFile(_Strict):
    """Root of ``configs/eks/targets.yaml``."""

    cluster: ClusterSpec
    targets: list[Target] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> TargetsFile:
        for attr in ("name", "file"):
            values = [getattr(t, attr) for t in self.targets]
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"targets: duplicate {attr}(s) {dup}")
        return self


def load_targets(path: str | Path) -> TargetsFile:
    """Read and validate the targets file; raise ConfigError naming the field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
        return TargetsFile.model_validate(raw)
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    except ValidationError as err:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{path}: invalid targets file:\n  " + "\n  ".join(lines)) from None


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, ``None`` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def effective_serve_config(target: Target, root: Path) -> tuple[dict[str, Any], list[AppConfig]]:
    """The Serve config document of this target (model and args overrides applied) and its AppConfigs.

    ``http_options`` is pinned to 0.0.0.0:8000 because KubeRay's serve Service targets port 8000 on
    every pod; any other host or port in the source file would leave the Service without endpoints.
    ``proxy_location`` comes from the target (a laptop config says HeadOnly; a cluster wants EveryNode).
    """
    doc, _ = load_serve_config(root / target.serve_config)
    doc = copy.deepcopy(doc)
    unused = set(target.model_overrides)
    for i, app in enumerate(doc["applications"]):
        for j, model in enumerate(app["args"].get("models", [])):
            patch = target.model_overrides.get(model.get("id"))
            if patch is not None:
                app["args"]["models"][j] = merge_patch(model, patch)
                unused.discard(model.get("id"))
        app["args"] = merge_patch(app["args"], target.args_overrides)
        doc["applications"][i] = app
    if unused:
        raise ConfigError(f"target {target.name}: model_overrides name unknown model id(s) {sorted(unused)}")
    doc["http_options"] = {**doc.get("http_options", {}), "host": "0.0.0.0", "port": 8000}
    doc["proxy_location"] = target.proxy_location
    apps = [load_app_config(a["args"], where=f"{target.name}: applications.{i}.args.")
            for i, a in enumerate(doc["applications"])]
    return doc, apps
