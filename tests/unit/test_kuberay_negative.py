"""Broken manifests are rejected, each with a message that names the field and the problem.

Each case takes the generated kuberay/ set, breaks one thing, and validates the whole set again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import yaml
from kuberay_support import schema_dir_or_skip

from serve_app.kuberay import render
from serve_app.kuberay.validate import load_documents, validate_documents

pytestmark = pytest.mark.unit

ROOT = render.repo_root()


@pytest.fixture(scope="module")
def pristine() -> list:
    schema_dir_or_skip()
    return load_documents(sorted((ROOT / "kuberay").glob("*.yaml")))


def _find(docs: list, kind: str, name: str | None = None) -> dict:
    return next(d for _, d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


def _rs(docs: list) -> dict:
    return _find(docs, "RayService", "kvserve-llama8b")


def _gpu_group(docs: list) -> dict:
    return next(g for g in _rs(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] != "cpu")


def _head(docs: list) -> dict:
    return _rs(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]


def _gpu_container(docs: list) -> dict:
    return _gpu_group(docs)["template"]["spec"]["containers"][0]


def _gpu_toleration(docs: list, **changes) -> None:
    (tol,) = [t for t in _gpu_group(docs)["template"]["spec"]["tolerations"] if t["key"] == "nvidia.com/gpu"]
    tol.update(changes)


def _timeout(docs: list, value: str) -> None:
    _rs(docs)["metadata"]["annotations"]["ray.io/initializing-timeout"] = value


def _add_secret(docs: list) -> None:
    docs.append(("extra.yaml#0", {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                  "metadata": {"name": "hf-token", "namespace": "kvserve"},
                                  "stringData": {"token": "hf_xxx"}}))


def _serve(docs: list, edit: Callable[[dict], None]) -> None:
    rs = _rs(docs)
    doc = yaml.safe_load(rs["spec"]["serveConfigV2"])
    edit(doc)
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(doc, sort_keys=False)


def _model(doc: dict) -> dict:
    return doc["applications"][0]["args"]["models"][0]


def _set(obj: dict, key: str, value) -> None:
    obj[key] = value


CASES: list[tuple[str, Callable[[list], None], str]] = [
    ("name-too-long", lambda d: _set(_rs(d)["metadata"], "name", "kvserve-" + "x" * 40),
     "is 48 characters; KubeRay allows at most 47"),
    ("upgrade-strategy", lambda d: _set(_rs(d)["spec"]["upgradeStrategy"], "type", "BlueGreen"),
     "spec.upgradeStrategy.type: 'BlueGreen' is not one of"),
    ("typo-in-worker-group", lambda d: _gpu_group(d).update(minReplica=1),
     "'minReplica' was unexpected"),
    ("min-above-max", lambda d: _gpu_group(d).update(minReplicas=9, replicas=9),
     "minReplicas (9) must be >= 0 and <= maxReplicas (8)"),
    ("max-replicas-string", lambda d: _gpu_group(d).update(maxReplicas="8"),
     "maxReplicas: '8' is not of type 'integer'"),
    ("upscaling-mode", lambda d: _rs(d)["spec"]["rayClusterConfig"]["autoscalerOptions"].update(
        upscalingMode="Fast"), "'Fast' is not one of ['Default', 'Aggressive', 'Conservative']"),
    ("head-service-name", lambda d: _head(d).update(headService={"metadata": {"name": "my-head"}}),
     "headService.metadata.name: must not be set"),
    ("head-ports-without-serve", lambda d: _head(d)["template"]["spec"]["containers"][0]["ports"].pop(3),
     "none named 'serve'"),
    ("restart-policy-v2", lambda d: _gpu_group(d)["template"]["spec"].update(restartPolicy="Always"),
     "autoscaler v2 needs Never or unset, got 'Always'"),
    ("fractional-num-cpus", lambda d: _gpu_group(d)["rayStartParams"].update(**{"num-cpus": "0.5"}),
     "rayStartParams[num-cpus]: `ray start --num-cpus` takes an integer, got '0.5'"),
    ("resources-and-num-cpus", lambda d: _gpu_group(d)["rayStartParams"].update(**{"num-cpus": "2"}),
     ("workerGroupSpecs.1.rayStartParams: sets ['num-cpus'] while spec.rayClusterConfig.workerGroupSpecs.1.resources "
     "is non-empty")),
    ("resources-and-num-gpus", lambda d: _gpu_group(d)["rayStartParams"].update(**{"num-gpus": "1"}),
     "KubeRay rejects a group that declares Ray resources in both places. Move them into resources"),
    ("initializing-timeout-word", lambda d: _timeout(d, "forever"),
     "metadata.annotations[ray.io/initializing-timeout]: 'forever' is neither a Go duration"),
    ("initializing-timeout-negative", lambda d: _timeout(d, "-5m"),
     "metadata.annotations[ray.io/initializing-timeout]: '-5m' is not positive; KubeRay rejects the RayService"),
    ("initializing-timeout-zero", lambda d: _timeout(d, "0"),
     "metadata.annotations[ray.io/initializing-timeout]: '0' is not positive"),
    ("deletion-delay-negative", lambda d: _rs(d)["spec"].update(rayClusterDeletionDelaySeconds=-5),
     "spec.rayClusterDeletionDelaySeconds: -5 is less than the minimum of 0"),
    ("replicas-above-max", lambda d: _gpu_group(d).update(replicas=9),
     "workerGroupSpecs.1.replicas: 9 is outside [minReplicas 1, maxReplicas 8] (lint, not an operator rejection"),
    ("gpu-request-not-limit", lambda d: _gpu_container(d)["resources"]["requests"].update({"nvidia.com/gpu": "2"}),
     "containers.0.resources: requests nvidia.com/gpu=2 but limits nvidia.com/gpu=1; Kubernetes rejects the pod"),
    ("group-cpus-below-replica", lambda d: _gpu_group(d)["resources"].update(CPU="1"),
     ("model llama-3.1-8b: a replica's placement bundles need 2 Ray CPUs on one pod (STRICT_PACK) but worker "
     "group(s) offer {'gpu-l40s-tp1': 1.0}")),
    ("serve-obsolete-key", lambda d: _serve(d, lambda s: _model(s)["deployment"]["autoscaling_config"].update(
        target_num_ongoing_requests_per_replica=4)),
     "unknown key 'target_num_ongoing_requests_per_replica' (not a field of AutoscalingConfig)"),
    ("serve-unknown-deployment-key", lambda d: _serve(d, lambda s: s["applications"][0].update(
        deployments=[{"name": "x", "max_concurrent_queries": 5}])),
     "applications.0.deployments.0: unknown key 'max_concurrent_queries'"),
    ("serve-app-config-typo", lambda d: _serve(d, lambda s: _model(s).update(tensor_paralel_size=2)),
     "models.0.tensor_paralel_size: Extra inputs are not permitted"),
    ("serve-min-above-max", lambda d: _serve(d, lambda s: _model(s)["deployment"]["autoscaling_config"].update(
        min_replicas=9)), "max_replicas (8) must be greater than or equal to min_replicas (9)"),
    ("serve-unknown-grpc-key", lambda d: _serve(d, lambda s: s.update(grpc_options={"port": 9000, "max_msg": 1})),
     "spec.serveConfigV2.grpc_options: unknown key 'max_msg' (not a field of gRPCOptionsSchema)"),
    ("serve-unknown-http-key", lambda d: _serve(d, lambda s: s["http_options"].update(keepalive_s=5)),
     "spec.serveConfigV2.http_options: unknown key 'keepalive_s' (not a field of HTTPOptionsSchema)"),
    ("serve-unknown-policy-key", lambda d: _serve(d, lambda s: _model(s)["deployment"]["autoscaling_config"].update(
        policy={"policy_function": "ray.serve.autoscaling_policy:default_autoscaling_policy", "polcy_kwargs": {}})),
     "models.0.deployment.autoscaling_config.policy: unknown key 'polcy_kwargs' (not a field of AutoscalingPolicy)"),
    ("serve-policy-unimportable", lambda d: _serve(d, lambda s: _model(s)["deployment"]["autoscaling_config"].update(
        policy={"policy_function": "no_such_vendor.policy:scale"})),
     "applications.0.args: Serve cannot load it (ModuleNotFoundError: No module named 'no_such_vendor')"),
    ("serve-port-vs-container", lambda d: _serve(d, lambda s: s["http_options"].update(port=8001)),
     ("headGroupSpec.template.spec.containers.0.ports[serve]: containerPort 8000 but spec.serveConfigV2."
     "http_options.port is 8001")),
    ("serve-proxy-disabled", lambda d: _serve(d, lambda s: s.update(proxy_location="Disabled")),
     "spec.serveConfigV2.proxy_location: Disabled starts no HTTP proxy"),
    ("serve-import-path-typo", lambda d: _serve(d, lambda s: s["applications"][0].update(
        import_path="serve_app.buildr:build_app")),
     "applications.0.import_path: cannot import 'serve_app.buildr:build_app' (ModuleNotFoundError"),
    ("serve-import-path-vendor", lambda d: _serve(d, lambda s: s["applications"][0].update(
        import_path="vendor_llm.serve:build_openai_app")),
     "applications.0.import_path: cannot import 'vendor_llm.serve:build_openai_app'"),
    ("tp-vs-gpu-limit", lambda d: _serve(d, lambda s: _model(s).update(tensor_parallel_size=2)),
     "model llama-3.1-8b: tensor_parallel_size 2 (STRICT_PACK, accelerator L40S) matches no worker group"),
    ("no-cpu-group-for-ingress", lambda d: _rs(d)["spec"]["rayClusterConfig"]["workerGroupSpecs"].pop(0),
     "ingress needs 1.0 CPUs per replica but no CPU worker group offers that"),
    ("hash-seed-missing", lambda d: _gpu_group(d)["template"]["spec"]["containers"][0].update(env=[
        e for e in _gpu_container(d)["env"] if e["name"] != "PYTHONHASHSEED"]),
     ("workerGroupSpecs[gpu-l40s-tp1]: routing.hash_seed_from_env is true but PYTHONHASHSEED does not come from a "
     "Secret")),
    ("object-store-over-shm", lambda d: _gpu_group(d)["rayStartParams"].update(
        **{"object-store-memory": str(64 * 2**30)}), "exceeds /dev/shm sizeLimit 18Gi"),
    ("kv-tier-capped-by-head", lambda d: _head(d)["rayStartParams"].update(**{"object-store-memory": str(2 * 2**30)}),
     "headGroupSpec: kv_tier.budget_gib 8.0 is capped to 1.2 GiB by this node's object store"),
    ("grace-too-short", lambda d: _gpu_group(d)["template"]["spec"].update(terminationGracePeriodSeconds=30),
     "terminationGracePeriodSeconds 30 < graceful_shutdown_timeout_s 300"),
    ("unknown-pvc", lambda d: _gpu_group(d)["template"]["spec"]["volumes"][2]["persistentVolumeClaim"].update(
        claimName="weights"), "PersistentVolumeClaim kvserve/weights is not among the documents"),
    ("missing-toleration", lambda d: _gpu_group(d)["template"]["spec"].pop("tolerations"),
     "does not tolerate taint nvidia.com/gpu=true:NoSchedule of NodePool kvserve-gpu-l40s"),
    ("toleration-wrong-value", lambda d: _gpu_toleration(d, operator="Equal", value="false"),
     ("workerGroupSpecs[gpu-l40s-tp1]: does not tolerate taint nvidia.com/gpu=true:NoSchedule of NodePool "
     "kvserve-gpu-l40s; its tolerations for nvidia.com/gpu are")),
    ("toleration-wrong-effect", lambda d: _gpu_toleration(d, effect="NoExecute"),
     "does not tolerate taint nvidia.com/gpu=true:NoSchedule of NodePool kvserve-gpu-l40s"),
    ("unknown-secret-env", lambda d: _gpu_container(d)["env"].append(
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}),
     "containers[ray-worker].env[HF_TOKEN].valueFrom.secretKeyRef: Secret kvserve/hf-token is not among the documents"),
    ("unknown-configmap-env", lambda d: _gpu_container(d)["env"].append(
        {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "kvserve-env", "key": "x"}}}),
     "env[X].valueFrom.configMapKeyRef: ConfigMap kvserve/kvserve-env is not among the documents"),
    ("unknown-secret-volume", lambda d: _gpu_group(d)["template"]["spec"]["volumes"].append(
        {"name": "creds", "secret": {"secretName": "aws-creds"}}),
     "volumes[creds].secret.secretName: Secret kvserve/aws-creds is not among the documents"),
    ("unknown-configmap-volume", lambda d: _head(d)["template"]["spec"]["volumes"].append(
        {"name": "cfg", "configMap": {"name": "kvserve-extra"}}),
     "headGroupSpec: volumes[cfg].configMap.name: ConfigMap kvserve/kvserve-extra is not among the documents"),
    ("secret-without-key", lambda d: (_add_secret(d), _gpu_container(d)["env"].append(
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "hf_token"}}})),
     "Secret kvserve/hf-token has no key 'hf_token' (keys ['token'])"),
    ("ray-version-mismatch", lambda d: _rs(d)["spec"]["rayClusterConfig"].update(rayVersion="2.52.0"),
     "rayVersion 2.52.0 does not match the serving image's RAY_VERSION 2.60.0"),
    ("podmonitor-port", lambda d: _find(d, "PodMonitor", "kvserve-ray-worker")["spec"]["podMetricsEndpoints"][0]
     .update(port="metrcs"), "port 'metrcs' is not declared on"),
    ("podmonitor-selects-nothing", lambda d: _find(d, "PodMonitor", "kvserve-ray-head")["spec"]["selector"]
     ["matchLabels"].update({"ray.io/node-type": "driver"}), "matches no Ray pod of the RayServices"),
    ("consolidate-too-soon", lambda d: _find(d, "NodePool", "kvserve-gpu-l40s")["spec"]["disruption"].update(
        consolidateAfter="60s"), "consolidateAfter 60s < Serve downscale_delay_s 600.0"),
    ("consolidation-policy", lambda d: _find(d, "NodePool", "kvserve-gpu-l40s")["spec"]["disruption"].update(
        consolidationPolicy="WhenIdle"), "'WhenIdle' is not one of"),
    ("gpu-limit-below-max", lambda d: _find(d, "NodePool", "kvserve-gpu-l40s")["spec"]["limits"].update(
        {"nvidia.com/gpu": "4"}), "maxReplicas 8 x 1 GPUs exceeds NodePool kvserve-gpu-l40s limit"),
    ("node-class-role-and-profile", lambda d: _find(d, "EC2NodeClass")["spec"].update(instanceProfile="p"),
     "must specify exactly one of ['role', 'instanceProfile']"),
    ("pvc-typo", lambda d: _find(d, "PersistentVolumeClaim")["spec"].update(acessModes=["ReadOnlyMany"]),
     "'acessModes' was unexpected"),
]


@pytest.mark.parametrize(("case", "breaks", "expected"), CASES, ids=[c[0] for c in CASES])
def test_broken_manifest_is_rejected_with_a_precise_message(pristine, case, breaks, expected):
    docs = copy.deepcopy(pristine)
    breaks(docs)
    messages = [str(p) for p in validate_documents(docs, ray_version="2.60.0")]
    assert any(expected in m for m in messages), f"{case}: expected {expected!r} in {messages}"


def test_defaults_and_nulls_are_handled_like_the_api_server(pristine):
    docs = copy.deepcopy(pristine)
    group = _gpu_group(docs)
    del group["minReplicas"]  # defaulted to 0 by the CRD
    group["replicas"] = 0
    _rs(docs)["spec"]["serveService"] = None  # pruned: not nullable
    assert [str(p) for p in validate_documents(docs, ray_version="2.60.0")] == []


def test_optional_references_and_matching_tolerations_are_accepted(pristine):
    docs = copy.deepcopy(pristine)
    _add_secret(docs)
    _gpu_container(docs)["env"] += [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}},
        {"name": "EXTRA", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "x", "optional": True}}}]
    _gpu_group(docs)["template"]["spec"]["volumes"].append(
        {"name": "creds", "secret": {"secretName": "absent", "optional": True}})
    _gpu_toleration(docs, operator="Equal", value="true")
    assert [str(p) for p in validate_documents(docs, ray_version="2.60.0")] == []


def test_a_file_validated_alone_reports_what_it_references(pristine):
    only = [(s, d) for s, d in pristine if d["kind"] == "RayService" and d["metadata"]["name"] == "kvserve-llama8b"]
    messages = [str(p) for p in validate_documents(copy.deepcopy(only))]
    assert any("NodePool kvserve-gpu-l40s is not among the documents" in m for m in messages)
