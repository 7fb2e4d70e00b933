"""The cluster surface of a RayService: who may reach which port, and the secrets its pods read.

Owns: ``SecuritySpec`` (the ``cluster.security`` block of configs/eks/targets.yaml), ``build_network_policy``
(one NetworkPolicy per target), ``auth_options`` (KubeRay's Ray token authentication), ``secret_mounts``
(the API-key Secret mounted where the ingress reads it) and ``secret_env`` (the hash seed from a Secret).

The NetworkPolicy selects every pod of the target (head and workers, old and new clusters during an
upgrade) and allows, on top of Kubernetes' default deny for selected pods:
  - everything from the target's own pods: Ray's GCS (6379), raylets, object managers, workers, and the
    vLLM KV-event PUB/replay sockets the ingress replicas subscribe to. Nothing outside reaches those;
  - the dashboard port (8265) from the KubeRay operator only (it deploys serveConfigV2 and reads status);
  - the serve port (8000) from ``serve_from`` (the load balancer, the ingress controller);
  - the metrics ports (8080, 44217, 44227) from the Prometheus namespace.
The Ray client port (10001) is reachable from the target's own pods only. ``kubectl port-forward``
enters the pod's network namespace and is not subject to the policy.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serve_app.config import AppConfig, ConfigError

DASHBOARD_PORT = 8265
METRICS_PORTS = (8080, 44217, 44227)
SERVE_PORT = 8000
#: the key the API-key Secret's files are read from: every key of the Secret is one tenant.
API_KEYS_VOLUME = "api-keys"
HASH_SEED_KEY = "seed"


class SecuritySpec(BaseModel):
    """Network exposure and secrets of the RayServices (``cluster.security`` in targets.yaml)."""

    model_config = ConfigDict(extra="forbid")

    serve_from: list[dict[str, Any]] = Field(
        min_length=1,
        description="NetworkPolicy peers allowed on the serve port 8000: the load balancer's subnets (ipBlock, "
        "ALB/NLB in IP mode) or the ingress controller's namespace (namespaceSelector).")
    operator_namespace: str = Field(default="kuberay-system", description="Namespace of the KubeRay operator.")
    operator_labels: dict[str, str] = Field(
        default={"app.kubernetes.io/name": "kuberay-operator"}, description="Labels of the KubeRay operator pod.")
    prometheus_namespace: str = Field(default="monitoring", description="Namespace of the Prometheus pods.")
    ray_token_secret: str | None = Field(
        default=None,
        description="Secret (key auth_token) holding Ray's token; unset = KubeRay generates one per RayCluster. "
        "Either way every Ray container gets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from it.")
    api_keys_secret: str = Field(
        default="kvserve-api-keys",
        description="Secret whose keys are tenants and values their API keys, mounted read-only at the "
        "auth.api_keys_path of applications that enable auth. Created out of band (never rendered).")
    hash_seed_secret: str | None = Field(
        default=None,
        description="Secret (key `seed`) holding the block-hash seed, set as the env var routing.hash_seed_env "
        "names on every Ray container. Created out of band (never rendered).")


def _selector(target_name: str) -> dict[str, Any]:
    return {"matchLabels": {"app.kubernetes.io/name": "kvserve", "app.kubernetes.io/instance": target_name}}


def build_network_policy(target_name: str, namespace: str, sec: SecuritySpec) -> dict[str, Any]:
    """The NetworkPolicy of one target's pods."""
    ports = lambda *ps: [{"protocol": "TCP", "port": p} for p in ps]
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": sec.operator_namespace}},
                "podSelector": {"matchLabels": dict(sec.operator_labels)}}
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": sec.prometheus_namespace}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{target_name}-ray", "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "kvserve", "app.kubernetes.io/instance": target_name}},
        "spec": {
            "podSelector": _selector(target_name),
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": _selector(target_name)}]},
                {"from": [operator], "ports": ports(DASHBOARD_PORT)},
                {"from": [dict(p) for p in sec.serve_from], "ports": ports(SERVE_PORT)},
                {"from": [prometheus], "ports": ports(*METRICS_PORTS)},
            ],
        },
    }


def auth_options(sec: SecuritySpec) -> dict[str, Any]:
    """rayClusterConfig.authOptions: Ray token authentication on the GCS, dashboard and agents (Ray >= 2.52)."""
    out: dict[str, Any] = {"mode": "token"}
    if sec.ray_token_secret:
        out["secretName"] = sec.ray_token_secret
    return out


def secret_mounts(apps: list[AppConfig], sec: SecuritySpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts) for the API-key Secret of applications that enable auth with api_keys_path.

    The volume is optional: a pod starts without the Secret, and an ingress with auth on and no key
    refuses to start (deployments.auth.Gate.from_app), so a missing Secret fails closed.
    """
    paths = {a.auth.api_keys_path for a in apps if a.auth.enabled and a.auth.api_keys_path}
    if len(paths) > 1:
        raise ConfigError(f"applications disagree on auth.api_keys_path {sorted(paths)}")
    if not paths:
        return [], []
    volume = {"name": API_KEYS_VOLUME, "secret": {"secretName": sec.api_keys_secret, "optional": True}}
    mount = {"name": API_KEYS_VOLUME, "mountPath": paths.pop(), "readOnly": True}
    return [volume], [mount]


def seed_from_secret(apps: list[AppConfig]) -> bool:
    """Whether the applications read the block-hash seed from PYTHONHASHSEED (routing.hash_seed_from_env)."""
    modes = {a.routing.hash_seed_from_env for a in apps}
    if len(modes) > 1:
        raise ConfigError("applications disagree on routing.hash_seed_from_env")
    return modes.pop()


def secret_env(apps: list[AppConfig], sec: SecuritySpec) -> list[dict[str, Any]]:
    """PYTHONHASHSEED from ``hash_seed_secret`` when the applications read their seed from it, else nothing.

    Optional, so that a missing Secret fails closed: the builder refuses to start without a seed.
    """
    if not seed_from_secret(apps):
        return []
    if sec.hash_seed_secret is None:
        raise ConfigError("routing.hash_seed_from_env is true but cluster.security.hash_seed_secret is not set "
                          "(the Secret that holds the seed)")
    return [{"name": "PYTHONHASHSEED", "valueFrom": {"secretKeyRef": {
        "name": sec.hash_seed_secret, "key": HASH_SEED_KEY, "optional": True}}}]
