"""Issue 6: for TP = 1, 2, 4, 8 the replica's placement bundles, their STRICT_PACK strategy and the
KubeRay worker group's ``nvidia.com/gpu`` limit agree, so a replica always fits one worker pod."""

from __future__ import annotations

import pytest

from serve_app.kuberay import render
from serve_app.kuberay.crosscheck import cross_check
from serve_app.kuberay.karpenter import build_karpenter
from serve_app.kuberay.rayservice import build_common, build_rayservice
from serve_app.kuberay.targets import ClusterSpec, Target, effective_serve_config

pytestmark = pytest.mark.unit

ROOT = render.repo_root()
TP_SIZES = [1, 2, 4, 8]

from deployments.vllm_replica import placement_bundles
from serve_app.kuberay.network import build_network_policy

CLUSTER = ClusterSpec.model_validate({
    "name": "test", "namespace": "kvserve", "node_role": "role", "service_account": "kvserve",
    "consolidate_after_s": 900,
    "model_store": {"bucket": "b", "region": "us-east-1"},
    "cpu_pool": {"name": "kvserve-cpu", "cpu_limit": 64},
    "gpu_pools": [{"name": "kvserve-gpu-h100", "accelerator_type": "H100", "instance_types": ["p5.48xlarge"],
                   "gpu_limit": 64, "cpu_per_gpu": 20, "memory_gib_per_gpu": 200, "object_store_gib_per_gpu": 32,
                   "gpus_per_node": 8}],
    "security": {"serve_from": [{"ipBlock": {"cidr": "10.0.0.0/16"}}]},
})


def _target(tp: int) -> Target:
    return Target(
        name=f"kvserve-tp{tp}", file=f"tp{tp}.yaml", serve_config="configs/gpu.yaml",
        image="registry/kvserve:0.1.0-ray2.60.0-gpu",
        model_overrides={"llama-3.1-8b": {"tensor_parallel_size": tp, "accelerator_type": "H100"}},
    )


def _render(tp: int):
    target = _target(tp)
    doc, apps = effective_serve_config(target, ROOT)
    rs = build_rayservice(target, CLUSTER, doc, apps, "2.60.0")
    gpu_groups = [g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] != "cpu"]
    return rs, apps, gpu_groups


def _limit(group: dict) -> int:
    return int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])


@pytest.mark.parametrize("tp", TP_SIZES)
def test_worker_group_gpu_limit_equals_tp(tp):
    rs, apps, groups = _render(tp)
    (group,) = groups
    assert group["groupName"] == f"gpu-h100-tp{tp}"
    assert _limit(group) == tp
    assert group["resources"] == {"CPU": "2", "accelerator_type:H100": "1"}
    assert "num-cpus" not in group["rayStartParams"]  # the operator rejects resources set in both places
    docs = [*build_common(CLUSTER), *build_karpenter(CLUSTER), rs,
            build_network_policy(rs["metadata"]["name"], CLUSTER.namespace, CLUSTER.security)]
    assert [m for _, m in cross_check(docs, {rs["metadata"]["name"]: apps}, "2.60.0")] == []


@pytest.mark.parametrize("tp", TP_SIZES)
def test_placement_bundles_fit_exactly_one_worker_pod(tp):
    _, apps, (group,) = _render(tp)
    model = apps[0].models[0]
    bundles, strategy = placement_bundles(model)
    assert strategy == "STRICT_PACK", "all TP ranks must land on one node, i.e. one worker pod"
    assert len(bundles) == tp
    assert sum(b.get("GPU", 0) for b in bundles) == _limit(group) == tp
    assert all(b.get("accelerator_type:H100", 0) > 0 for b in bundles)
    assert float(group["resources"]["CPU"]) >= sum(b.get("CPU", 0) for b in bundles)
    assert bundles[0]["CPU"] == model.deployment.ray_actor_options["num_cpus"]


@pytest.mark.parametrize(("model_tp", "pod_gpus"), [(2, 1), (4, 8), (8, 4)])
def test_tp_and_gpu_limit_mismatch_is_caught(model_tp, pod_gpus):
    rs, _, (group,) = _render(pod_gpus)
    assert _limit(group) == pod_gpus
    _, mismatched, _ = _render(model_tp)
    messages = [m for _, m in cross_check([rs], {rs["metadata"]["name"]: mismatched}, None)]
    assert any(f"tensor_parallel_size {model_tp} (STRICT_PACK" in m for m in messages), messages


def test_two_shapes_get_two_worker_groups():
    target = Target(
        name="kvserve-two", file="two.yaml", serve_config="configs/gpu.yaml", image="r/kvserve:0.1.0-ray2.60.0-gpu",
        model_overrides={"llama-3.1-8b": {"tensor_parallel_size": 2, "accelerator_type": "H100"}},
    )
    doc, apps = effective_serve_config(target, ROOT)
    second = apps[0].models[0].model_copy(update={"id": "small", "tensor_parallel_size": 1})
    apps[0].models.append(second)
    rs = build_rayservice(target, CLUSTER, doc, apps, "2.60.0")
    names = [g["groupName"] for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    assert names == ["cpu", "gpu-h100-tp1", "gpu-h100-tp2"]
