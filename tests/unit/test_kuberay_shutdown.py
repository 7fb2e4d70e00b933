"""Shutdown and node-shape rules of the rendered cluster: grace periods cover the longest request, worker
pods drain their Ray node in preStop, GPU pools launch only nodes of the declared GPU count; and the
drain hook's wait loop (serve_app/drain.py) returns when the node is empty or at its deadline."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kuberay_support import copy_inputs

from serve_app.config import ConfigError
from serve_app.drain import NodeLoad, wait_drained
from serve_app.kuberay import render
from serve_app.kuberay.targets import GpuPool

pytestmark = pytest.mark.unit

ROOT = render.repo_root()


def _rayservices() -> list[dict]:
    docs = []
    for f in sorted((ROOT / "kuberay").glob("rayservice-*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d and d["kind"] == "RayService"]
    return docs


@pytest.mark.parametrize("rs", _rayservices(), ids=lambda rs: rs["metadata"]["name"])
def test_every_worker_drains_its_node_within_its_grace_period(rs):
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    args = serve["applications"][0]["args"]
    timeout = args["ingress"]["request_timeout_s"]
    waits = [args["ingress"]["deployment"]["graceful_shutdown_timeout_s"]]
    waits += [m["deployment"]["graceful_shutdown_timeout_s"] for m in args["models"]]
    assert min(waits) >= timeout  # no deployment stops before its longest request could end
    assert rs["spec"]["rayClusterDeletionDelaySeconds"] >= max(waits)  # the old cluster outlives its requests
    for group in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        cmd = container["lifecycle"]["preStop"]["exec"]["command"]
        assert cmd[:2] == ["kvserve", "drain"]
        deadline = int(cmd[cmd.index("--deadline-s") + 1])
        assert max(waits) < deadline < pod["terminationGracePeriodSeconds"]


def test_gpu_groups_declare_cpus_as_group_resources_not_start_params():
    for rs in _rayservices():
        for group in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
            if group.get("resources"):  # the operator rejects resources in both places
                assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(group["rayStartParams"])
                assert any(k.startswith("accelerator_type:") for k in group["resources"])
                assert int(group["resources"]["CPU"]) >= 1


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return copy_inputs(tmp_path)


def test_a_grace_period_shorter_than_the_request_timeout_is_refused(tree):
    config = tree / "configs" / "gpu.yaml"
    config.write_text(config.read_text().replace("request_timeout_s: 300", "request_timeout_s: 900"))
    with pytest.raises(ConfigError, match=r"kvserve-llama8b: .*graceful_shutdown_timeout_s=300 .*"
                                          r"< ingress.request_timeout_s=900"):
        render.render_all(tree)


def test_a_tp2_model_on_a_single_gpu_pool_is_refused(tree):
    targets = tree / "configs" / "eks" / "targets.yaml"
    text = targets.read_text()
    targets.write_text(text.replace("accelerator_type: L4\n", "accelerator_type: L40S\n"))
    with pytest.raises(ConfigError, match="need 2 GPUs on one node .* kvserve-gpu-l40s has 1 per node"):
        render.render_all(tree)


def test_karpenter_gpu_pools_pin_the_gpu_count_and_the_head_pool_never_expires():
    pools = {d["metadata"]["name"]: d for d in yaml.safe_load_all((ROOT / "kuberay" / "karpenter.yaml").read_text())
             if d and d["kind"] == "NodePool"}
    assert pools["kvserve-cpu"]["spec"]["template"]["spec"]["expireAfter"] == "Never"
    reqs = {r["key"]: r["values"] for r in pools["kvserve-gpu-l40s"]["spec"]["template"]["spec"]["requirements"]}
    assert reqs["karpenter.k8s.aws/instance-gpu-count"] == ["1"]
    assert pools["kvserve-gpu-l40s"]["spec"]["disruption"]["budgets"] == [{"nodes": "1"}]


def test_a_pool_listing_an_instance_with_another_gpu_count_is_refused():
    with pytest.raises(ValueError, match=r"\['g6e.12xlarge'\] do not have gpus_per_node=1"):
        GpuPool(name="p", accelerator_type="L40S", instance_types=["g6e.2xlarge", "g6e.12xlarge"], gpu_limit=4,
                cpu_per_gpu=6, memory_gib_per_gpu=52, object_store_gib_per_gpu=16, gpus_per_node=1)


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_drain_waits_for_replicas_then_the_proxy():
    loads = iter([NodeLoad(2, "DRAINING"), NodeLoad(1, "DRAINING"), NodeLoad(0, "DRAINING"), NodeLoad(0, None)])
    clock = _Clock()
    drained, last = wait_drained(lambda: next(loads), 60, poll_s=2, clock=clock, sleep=clock.sleep)
    assert drained and last == NodeLoad(0, None)
    assert clock.t == 6  # three polls of 2 s


def test_drain_gives_up_at_the_deadline():
    clock = _Clock()
    drained, last = wait_drained(lambda: NodeLoad(1, "HEALTHY"), 5, poll_s=2, clock=clock, sleep=clock.sleep)
    assert not drained and last.replicas == 1
    assert clock.t == 5  # 2 + 2 + the remaining 1, never past the deadline
