"""Karpenter (v1) node pools and node class for the serving cluster.

Owns: ``build_karpenter`` -> [EC2NodeClass, NodePool (CPU), NodePool per GPU type].

- One EC2NodeClass (Bottlerocket: the NVIDIA variant ships the device plugin, so ``nvidia.com/gpu``
  is advertised without a DaemonSet; instance-store NVMe in RAID0 holds images and caches).
- The CPU pool hosts the head (``karpenter.sh/do-not-disrupt`` on the pod) and the ingress group; its
  nodes never expire (``expireAfter: Never``): expiring the head's node would restart the service.
- Each GPU pool requires ``karpenter.k8s.aws/instance-gpu-count`` = the pool's GPUs per node and is
  disrupted (drift, expiry) ``gpu_disruption_budget`` nodes at a time.
- Each GPU pool is tainted ``nvidia.com/gpu:NoSchedule`` (only Ray GPU workers tolerate it), has a
  ``nvidia.com/gpu`` limit as a cost guard, and consolidates only ``WhenEmpty`` after
  ``consolidateAfter`` >= every Serve ``downscale_delay_s`` (a node emptied by a replica restart is
  not reclaimed faster than Serve itself would scale down).
"""

from __future__ import annotations

from typing import Any

from serve_app.kuberay.targets import ClusterSpec

NODE_CLASS = "kvserve"


def build_node_class(cluster: ClusterSpec) -> dict[str, Any]:
    """The EC2NodeClass shared by all pools."""
    discovery = {"karpenter.sh/discovery": cluster.name}
    return {
        "apiVersion": "karpenter.k8s.aws/v1",
        "kind": "EC2NodeClass",
        "metadata": {"name": NODE_CLASS},
        "spec": {
            "role": cluster.node_role,
            "amiSelectorTerms": [{"alias": cluster.ami_alias}],
            "subnetSelectorTerms": [{"tags": discovery}],
            "securityGroupSelectorTerms": [{"tags": discovery}],
            "instanceStorePolicy": "RAID0",
            "blockDeviceMappings": [
                {"deviceName": "/dev/xvda",
                 "ebs": {"volumeSize": "8Gi", "volumeType": "gp3", "encrypted": True, "deleteOnTermination": True}},
                {"deviceName": "/dev/xvdb",  # Bottlerocket data volume: container images (10-20 GB each)
                 "ebs": {"volumeSize": f"{cluster.root_volume_gib}Gi", "volumeType": "gp3", "iops": 10000,
                         "throughput": 750, "encrypted": True, "deleteOnTermination": True}},
            ],
            "metadataOptions": {"httpEndpoint": "enabled", "httpProtocolIPv6": "disabled",
                                "httpPutResponseHopLimit": 1, "httpTokens": "required"},
            "tags": {"app.kubernetes.io/name": "kvserve", "kvserve/cluster": cluster.name},
        },
    }


def _pool(name: str, requirements: list[dict[str, Any]], limits: dict[str, str], cluster: ClusterSpec,
          policy: str, taints: list[dict[str, str]], weight: int, expire_after: str,
          budget: str | None = None) -> dict[str, Any]:
    template_spec: dict[str, Any] = {
        "nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": NODE_CLASS},
        "requirements": requirements,
        "expireAfter": expire_after,
        "terminationGracePeriod": cluster.node_termination_grace,
    }
    if taints:
        template_spec["taints"] = taints
    return {
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodePool",
        "metadata": {"name": name},
        "spec": {
            "weight": weight,
            "template": {"metadata": {"labels": {"app.kubernetes.io/name": "kvserve"}}, "spec": template_spec},
            "limits": limits,
            "disruption": {"consolidationPolicy": policy, "consolidateAfter": f"{cluster.consolidate_after_s}s",
                           **({"budgets": [{"nodes": budget}]} if budget else {})},
        },
    }


def _req(key: str, values: list[str], operator: str = "In") -> dict[str, Any]:
    return {"key": key, "operator": operator, "values": values}


def build_karpenter(cluster: ClusterSpec) -> list[dict[str, Any]]:
    """EC2NodeClass and NodePools of the cluster."""
    cpu = cluster.cpu_pool
    docs = [build_node_class(cluster), _pool(
        cpu.name,
        [_req("kubernetes.io/arch", ["amd64"]), _req("kubernetes.io/os", ["linux"]),
         _req("karpenter.sh/capacity-type", ["on-demand"]),
         _req("karpenter.k8s.aws/instance-category", list(cpu.instance_categories)),
         _req("karpenter.k8s.aws/instance-generation", [str(cpu.min_generation - 1)], "Gt")],
        {"cpu": str(cpu.cpu_limit)}, cluster, "WhenEmptyOrUnderutilized", [], 10, "Never")]
    for pool in cluster.gpu_pools:
        docs.append(_pool(
            pool.name,
            [_req("kubernetes.io/arch", ["amd64"]), _req("kubernetes.io/os", ["linux"]),
             _req("karpenter.sh/capacity-type", list(pool.capacity_types)),
             _req("node.kubernetes.io/instance-type", list(pool.instance_types)),
             _req("karpenter.k8s.aws/instance-gpu-count", [str(pool.gpus_per_node)])],
            {"nvidia.com/gpu": str(pool.gpu_limit)}, cluster, "WhenEmpty",
            [{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}], 50, cluster.node_expire_after,
            cluster.gpu_disruption_budget))
    return docs
