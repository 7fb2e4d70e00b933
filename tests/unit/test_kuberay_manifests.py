"""The generated kuberay/ manifests: valid as a set, realistic where the issue requires it, and in step
with the Dockerfile, the Serve configs and the project's metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from kuberay_support import schema_dir_or_skip

from serve_app.kuberay import render
from serve_app.kuberay.dashboard import METRICS_USED, build_dashboard
from serve_app.kuberay.rules import RESOURCE_START_PARAMS
from serve_app.kuberay.targets import effective_serve_config, load_targets
from serve_app.kuberay.units import duration_s, quantity_bytes
from serve_app.kuberay.validate import load_documents, validate_documents

pytestmark = pytest.mark.unit

ROOT = render.repo_root()
MANIFESTS = sorted((ROOT / "kuberay").glob("*.yaml"))
RAYSERVICE_FILES = [p for p in MANIFESTS if p.name.startswith("rayservice-")]


@pytest.fixture(scope="module")
def schema_dir() -> Path:
    return schema_dir_or_skip()


@pytest.fixture(scope="module")
def docs() -> list:
    return load_documents(MANIFESTS)


def _rayservice(path: Path) -> dict:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "RayService"]
    return doc


def _groups(rs: dict) -> list[tuple[str, dict]]:
    rcc = rs["spec"]["rayClusterConfig"]
    return [("head", rcc["headGroupSpec"])] + [(g["groupName"], g) for g in rcc["workerGroupSpecs"]]


def test_expected_manifests_exist():
    names = {p.name for p in MANIFESTS}
    assert {"common.yaml", "karpenter.yaml", "monitoring.yaml", "rayservice-llama8b.yaml",
            "rayservice-llama8b-tp2.yaml", "rayservice-cpu-smoke.yaml"} <= names
    assert (ROOT / "kuberay" / "grafana-dashboard.json").is_file()


def test_every_generated_manifest_is_valid_together(docs, schema_dir):
    problems = validate_documents(docs, schema_dir, ray_version=render.ray_version(ROOT))
    assert [str(p) for p in problems] == []


def test_every_document_was_checked_by_a_schema(docs, schema_dir):
    kinds = sorted({(d["apiVersion"], d["kind"]) for _, d in docs})
    assert ("ray.io/v1", "RayService") in kinds
    assert {("karpenter.sh/v1", "NodePool"), ("karpenter.k8s.aws/v1", "EC2NodeClass"),
            ("monitoring.coreos.com/v1", "PodMonitor"), ("v1", "PersistentVolumeClaim"),
            ("v1", "ConfigMap")} <= set(kinds)


def test_rayservices_also_pass_kuberay_1_5_crds(schema_dir):
    old = schema_dir / "kuberay" / "v1.5.2"
    if not old.is_dir():
        pytest.skip("KubeRay 1.5.2 CRDs not present")
    from serve_app.kuberay.crd import CrdSchemas

    schemas = CrdSchemas(old)
    for path in RAYSERVICE_FILES:
        assert schemas.validate(_rayservice(path)) == [], path.name


@pytest.mark.parametrize("path", RAYSERVICE_FILES, ids=lambda p: p.stem)
def test_rayservice_has_the_production_shape(path):
    rs = _rayservice(path)
    spec, rcc = rs["spec"], rs["spec"]["rayClusterConfig"]
    assert len(rs["metadata"]["name"]) <= 47
    assert rs["metadata"]["annotations"]["ray.io/initializing-timeout"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    assert rcc["enableInTreeAutoscaling"] is True and rcc["autoscalerOptions"]["version"] == "v2"
    head = rcc["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
    head_ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["serve"] == 8000 and head_ports["metrics"] == 8080
    serve_doc = yaml.safe_load(spec["serveConfigV2"])
    assert serve_doc["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert serve_doc["proxy_location"] == "EveryNode"
    graceful = max(m["deployment"].get("graceful_shutdown_timeout_s", 60)
                   for a in serve_doc["applications"] for m in a["args"]["models"])
    assert spec["rayClusterDeletionDelaySeconds"] >= graceful
    for name, group in _groups(rs):
        pod = group["template"]["spec"]
        (c,) = pod["containers"]
        env = {e["name"]: e.get("value") or e["valueFrom"] for e in c["env"]}
        seed_ref = {"secretKeyRef": {"name": "kvserve-hash-seed", "key": "seed", "optional": True}}
        assert env["PYTHONHASHSEED"] in ("0", seed_ref), name  # the GPU targets read the seed from a Secret
        assert {"serve", "metrics"} <= {p["name"] for p in c["ports"]}, name
        assert pod["terminationGracePeriodSeconds"] >= graceful, name
        (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        store = int(group["rayStartParams"]["object-store-memory"])
        shm_bytes = quantity_bytes(shm["emptyDir"]["sizeLimit"])
        assert store <= shm_bytes < quantity_bytes(c["resources"]["limits"]["memory"])
        if name != "head":
            assert 0 <= group["minReplicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("path", [p for p in RAYSERVICE_FILES if "cpu" not in p.name], ids=lambda p: p.stem)
def test_gpu_groups_can_scale_from_zero_onto_their_node_pool(path):
    rs = _rayservice(path)
    gpu_groups = [g for _, g in _groups(rs)
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups
    for g in gpu_groups:
        pod = g["template"]["spec"]
        assert any(k.startswith("accelerator_type:") for k in g["resources"]), g["groupName"]
        # Ray CPUs are declared in resources: KubeRay rejects them next to rayStartParams num-cpus.
        assert g["resources"].get("CPU") and not set(RESOURCE_START_PARAMS) & set(g["rayStartParams"]), g["groupName"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"]["karpenter.sh/nodepool"].startswith("kvserve-gpu-")
        assert any(v.get("persistentVolumeClaim") for v in pod["volumes"]), "model store not mounted"


def test_tp2_variant_has_two_gpus_per_worker_pod():
    rs = _rayservice(ROOT / "kuberay" / "rayservice-llama8b-tp2.yaml")
    limits = {name: g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
              for name, g in _groups(rs)}
    assert limits["gpu-l4-tp2"] == "2"
    model = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]["models"][0]
    assert model["tensor_parallel_size"] == 2
    assert model["engine_kwargs"]["disable_custom_all_reduce"] is True


def test_cpu_smoke_test_runs_anywhere():
    rs = _rayservice(ROOT / "kuberay" / "rayservice-cpu-smoke.yaml")
    for name, g in _groups(rs):
        pod = g["template"]["spec"]
        assert "nodeSelector" not in pod and "tolerations" not in pod, name
        assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"], name
        assert not any(v.get("persistentVolumeClaim") for v in pod["volumes"]), name


def test_consolidate_after_covers_every_serve_downscale_delay():
    spec = load_targets(ROOT / render.TARGETS_FILE)
    delays = []
    for t in spec.targets:
        _, apps = effective_serve_config(t, ROOT)
        delays += [float(m.deployment.autoscaling_config.get("downscale_delay_s", 600.0))
                   for a in apps for m in a.models if m.deployment.autoscaling_config]
    assert delays, "no target autoscales"
    pools = [d for d in yaml.safe_load_all((ROOT / "kuberay" / "karpenter.yaml").read_text())
             if d and d["kind"] == "NodePool"]
    for pool in pools:
        assert duration_s(pool["spec"]["disruption"]["consolidateAfter"]) >= max(delays), pool["metadata"]["name"]
        if "nvidia.com/gpu" in pool["spec"]["limits"]:
            assert pool["spec"]["template"]["spec"]["taints"][0]["key"] == "nvidia.com/gpu"
            assert pool["spec"]["disruption"]["consolidationPolicy"] == "WhenEmpty"


def test_worker_group_bounds_follow_serve_autoscaling():
    spec = load_targets(ROOT / render.TARGETS_FILE)
    (target,) = [t for t in spec.targets if t.name == "kvserve-llama8b"]
    _, apps = effective_serve_config(target, ROOT)
    lo, hi = apps[0].models[0].deployment.replica_bounds()
    group = dict(_groups(_rayservice(ROOT / "kuberay" / target.file)))["gpu-l40s-tp1"]
    assert (group["minReplicas"], group["maxReplicas"]) == (lo, hi) == (1, 8)


def test_dockerfile_pins_the_ray_version_of_every_manifest_and_image():
    text = (ROOT / "kuberay" / "Dockerfile").read_text()
    version = render.ray_version(ROOT)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{BASE_TAG\}$", text, re.MULTILINE)
    assert re.search(r"^ARG BASE_TAG=py311-cu12\d$", text, re.MULTILINE)
    assert re.search(r"^ARG VLLM_VERSION=0\.26\.0$", text, re.MULTILINE)
    for path in RAYSERVICE_FILES:
        rs = _rayservice(path)
        assert rs["spec"]["rayClusterConfig"]["rayVersion"] == version, path.name
        for _, g in _groups(rs):
            assert f"ray{version}" in g["template"]["spec"]["containers"][0]["image"], path.name
    import ray

    assert ray.__version__ == version, "serveConfigV2 is checked against the installed ray.serve.schema"


def _declared_metrics() -> dict[str, str]:
    """Exported name -> kind of every metric deployments/metrics.py declares (``ray_`` + name + suffix)."""
    text = (ROOT / "deployments" / "metrics.py").read_text()
    out = {}
    for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"([a-z_]+)\"", text):
        suffix = {"Counter": "_total", "Histogram": "_bucket", "Gauge": ""}[kind]
        out[f"ray_{name}{suffix}"] = kind
    return out


def test_dashboard_queries_only_metrics_the_project_declares():
    declared = _declared_metrics()
    ours = [m for m in METRICS_USED if m.startswith(("ray_model_", "ray_kvserve_"))]
    assert [m for m in ours if m not in declared] == [], "dashboard queries a metric metrics.py does not declare"
    headline = {"ray_model_invocations_total", "ray_model_latency_milliseconds_bucket",
                "ray_model_ttfb_milliseconds_bucket", "ray_model_concurrent_requests",
                "ray_kvserve_cached_prompt_tokens_total", "ray_kvserve_prompt_tokens_total",
                "ray_kvserve_kv_tier_hit_tokens_total", "ray_kvserve_kv_tier_directory_bytes",
                "ray_kvserve_router_decisions_total", "ray_serve_deployment_replica_healthy",
                "ray_kvserve_auth_rejected_requests_total", "ray_kvserve_rate_limited_requests_total"}
    assert headline <= set(METRICS_USED)


def test_dashboard_file_and_configmap_match_the_generator():
    on_disk = json.loads((ROOT / "kuberay" / "grafana-dashboard.json").read_text())
    assert on_disk == build_dashboard()
    ids = [p["id"] for p in on_disk["panels"]]
    assert len(ids) == len(set(ids))
    cm = [d for d in yaml.safe_load_all((ROOT / "kuberay" / "monitoring.yaml").read_text()) if d["kind"] == "ConfigMap"]
    assert json.loads(cm[0]["data"]["grafana-dashboard.json"]) == on_disk
