"""The operator, pod and serveConfigV2 rules on small explicit manifests, independent of what the renderer emits.

Each case states the KubeRay (or Kubernetes, or Serve) behaviour it mirrors; the broken copies of the
generated set live in test_kuberay_negative.py.
"""

from __future__ import annotations

import pytest
import yaml

from serve_app.kuberay.crosscheck import ray_cpus
from serve_app.kuberay.references import tolerates
from serve_app.kuberay.rules import rayservice_rules
from serve_app.kuberay.rules_serve import serve_config_rules, unknown_keys
from serve_app.kuberay.units import go_duration_s, quantity

pytestmark = pytest.mark.unit

WORKER = "spec.rayClusterConfig.workerGroupSpecs.0"


def make_group(params: dict | None = None, resources: dict | None = None, **extra) -> dict:
    container = {"name": "ray-worker", "image": "rayproject/ray:2.60.0",
                 "ports": [{"name": "serve", "containerPort": 8000}],
                 "resources": {"limits": {"cpu": "4"}, "requests": {"cpu": "4"}}}
    group = {"groupName": "gpu", "minReplicas": 0, "maxReplicas": 2, "rayStartParams": params or {},
             "template": {"spec": {"containers": [container]}}, **extra}
    if resources is not None:
        group["resources"] = resources
    return group


def make_rayservice(worker: dict | None = None, annotations: dict | None = None, serve: dict | None = None) -> dict:
    head = {"rayStartParams": {"num-cpus": "0"}, "template": {"spec": {"containers": [
        {"name": "ray-head", "image": "rayproject/ray:2.60.0", "ports": [{"name": "serve", "containerPort": 8000}]}]}}}
    serve = serve or {"applications": [{"name": "app", "import_path": "serve_app.builder:build_app", "args": {}}]}
    return {"apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": {"name": "svc", "namespace": "ns", "annotations": annotations or {}},
            "spec": {"serveConfigV2": yaml.safe_dump(serve),
                     "rayClusterConfig": {"headGroupSpec": head, "workerGroupSpecs": [worker or make_group()]}}}


# validateRayGroupResources: any of the four rayStartParams next to a non-empty resources map.
@pytest.mark.parametrize("param", ["num-cpus", "num-gpus", "memory", "resources"])
def test_a_group_with_resources_may_not_set_any_resource_start_param(param):
    value = '"{\\"x\\": 1}"' if param == "resources" else "1"
    rs = make_rayservice(make_group({param: value}, {"accelerator_type:L40S": "1"}))
    assert [m for m in rayservice_rules(rs) if "both places" in m] == [
        (f"{WORKER}.rayStartParams: sets [{param!r}] while {WORKER}.resources is non-empty "
         "(['accelerator_type:L40S']); "
        "KubeRay rejects a group that declares Ray resources in both places. Move them into resources (CPU becomes "
        "--num-cpus, GPU --num-gpus, memory --memory, any other key --resources)")]


def test_resources_alone_or_start_params_alone_are_accepted():
    assert rayservice_rules(make_rayservice(make_group({"object-store-memory": "1000"},
                                                       {"CPU": "2", "accelerator_type:L40S": "1"}))) == []
    assert rayservice_rules(make_rayservice(make_group({"num-cpus": "2"}, {}))) == []


def test_an_unparseable_resource_quantity_is_rejected():
    rs = make_rayservice(make_group({}, {"CPU": "two"}))
    assert rayservice_rules(rs) == [(f"{WORKER}.resources[CPU]: 'two' is not a Kubernetes quantity; KubeRay would "
                                    "silently drop it from `ray start`")]


def test_ray_cpus_reads_resources_then_start_params_then_the_limit():
    tpl = make_group()["template"]
    assert ray_cpus(make_group({}, {"cpu": "1500m"}), tpl) == 2.0  # the operator rounds a quantity up
    assert ray_cpus(make_group({"num-cpus": "3"}), tpl) == 3.0
    assert ray_cpus(make_group(), tpl) == 4.0


@pytest.mark.parametrize("value", ["45m", "1h30m", "1.5h", "300s", "300", "+10m"])
def test_initializing_timeout_accepts_go_durations_and_positive_seconds(value):
    assert rayservice_rules(make_rayservice(annotations={"ray.io/initializing-timeout": value})) == []


@pytest.mark.parametrize(("value", "problem"), [
    ("forever", "is neither a Go duration"), ("45 m", "is neither a Go duration"), ("1d", "is neither a Go duration"),
    ("-5m", "is not positive"), ("0", "is not positive"), ("-30", "is not positive"), ("0s", "is not positive"),
])
def test_initializing_timeout_rejects_what_kuberay_rejects(value, problem):
    (msg,) = rayservice_rules(make_rayservice(annotations={"ray.io/initializing-timeout": value}))
    assert msg.startswith(f"metadata.annotations[ray.io/initializing-timeout]: {value!r} {problem}")


def test_go_durations_and_quantities_parse_like_their_consumers():
    assert go_duration_s("1h30m") == 5400 and go_duration_s("300ms") == 0.3 and go_duration_s("-5m") == -300
    assert quantity("500m") == 0.5 and quantity("16Gi") == 16 * 2**30 and quantity("1e3") == 1000 and quantity(2) == 2
    for bad in ("300", "5 m", "m"):
        with pytest.raises(ValueError, match="not a Go duration"):
            go_duration_s(bad)


def test_replicas_outside_the_bounds_is_a_lint_not_an_operator_rejection():
    (msg,) = rayservice_rules(make_rayservice(make_group(replicas=5)))
    assert msg == (f"{WORKER}.replicas: 5 is outside [minReplicas 0, maxReplicas 2] (lint, not an operator "
                   "rejection: KubeRay clamps it and starts 2 pods; write that value instead)")


@pytest.mark.parametrize(("requests", "limits", "problem"), [
    ({"nvidia.com/gpu": "1"}, {"nvidia.com/gpu": "2"}, "requests nvidia.com/gpu=1 but limits nvidia.com/gpu=2"),
    ({"nvidia.com/gpu": "1"}, {}, "requests nvidia.com/gpu without a limit"),
])
def test_gpu_request_must_equal_its_limit(requests, limits, problem):
    group = make_group()
    group["template"]["spec"]["containers"][0]["resources"] = {"requests": requests, "limits": limits}
    (msg,) = rayservice_rules(make_rayservice(group))
    assert msg.startswith(f"{WORKER}.template.spec.containers.0.resources: {problem}; Kubernetes rejects the pod")


def test_gpu_limit_alone_or_equal_request_is_accepted():
    group = make_group()
    group["template"]["spec"]["containers"][0]["resources"] = {"requests": {"nvidia.com/gpu": 1},
                                                               "limits": {"nvidia.com/gpu": "1"}}
    assert rayservice_rules(make_rayservice(group)) == []


TAINT = {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}


@pytest.mark.parametrize(("toleration", "ok"), [
    ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, True),
    ({"key": "nvidia.com/gpu", "operator": "Exists"}, True),  # an empty effect matches every effect
    ({"key": "nvidia.com/gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"}, True),
    ({"key": "nvidia.com/gpu", "value": "true"}, True),  # operator defaults to Equal
    ({"operator": "Exists"}, True),  # an empty key with Exists tolerates everything
    ({"key": "nvidia.com/gpu", "operator": "Equal", "value": "false", "effect": "NoSchedule"}, False),
    ({"key": "nvidia.com/gpu", "operator": "Equal", "effect": "NoSchedule"}, False),  # value "" != "true"
    ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}, False),
    ({"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}, False),
])
def test_tolerations_match_taints_like_the_scheduler(toleration, ok):
    assert tolerates(toleration, TAINT) is ok


def _serve_errors(serve: dict, worker: dict | None = None) -> list[str]:
    return serve_config_rules(make_rayservice(worker, serve=serve))[0]


def _app(import_path: str, **extra) -> dict:
    return {"applications": [{"name": "app", "import_path": import_path, "args": {}, **extra}]}


def test_import_paths_must_import():
    assert _serve_errors(_app("serve_app.buildr:build_app"))[0].startswith(
        "spec.serveConfigV2.applications.0.import_path: cannot import 'serve_app.buildr:build_app' "
        "(ModuleNotFoundError: No module named 'serve_app.buildr')")
    assert _serve_errors(_app("serve_app.builder:build_ap"))[0].startswith(
        "spec.serveConfigV2.applications.0.import_path: cannot import 'serve_app.builder:build_ap' (AttributeError")
    assert _serve_errors(_app("no_such_vendor.app:build"))[0].startswith(
        "spec.serveConfigV2.applications.0.import_path: cannot import 'no_such_vendor.app:build'")


def test_a_project_import_path_other_than_the_builder_is_rejected():
    assert _serve_errors(_app("serve_app.config:load_app_config")) == [
        ("spec.serveConfigV2.applications.0.import_path: 'serve_app.config:load_app_config' is a project module "
        "but not the builder serve_app.builder:build_app; its args would go unchecked (no AppConfig, "
        "tensor-parallel or replica cross-checks)")]


def test_the_builder_is_recognised_in_dotted_form_and_its_args_are_checked():
    errs, _ = serve_config_rules(make_rayservice(serve=_app("serve_app.builder.build_app")))
    assert errs and all("import_path" not in e for e in errs)  # empty args: AppConfig reports missing models


def test_unknown_keys_are_found_at_every_level_of_the_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    doc = {"grpc_options": {"port": 9000, "max_message_size": 1}, "http_options": {"prot": 8000},
           "applications": [{"name": "a", "import_path": "x:y", "deployments": [
               {"name": "d", "autoscaling_config": {"policy": {"policy_function": "m:f", "bogus": 1}},
                "ray_actor_options": {"num_cpu": 1}}]}]}
    assert unknown_keys("s", doc, ServeDeploySchema) == [
        "s.grpc_options: unknown key 'max_message_size' (not a field of gRPCOptionsSchema)",
        "s.http_options: unknown key 'prot' (not a field of HTTPOptionsSchema)",
        ("s.applications.0.deployments.0.autoscaling_config.policy: unknown key 'bogus' (not a field of "
        "AutoscalingPolicy)"),
        ("s.applications.0.deployments.0.ray_actor_options: unknown key 'num_cpu' (not a field of "
        "RayActorOptionsSchema)")]


@pytest.mark.parametrize(("serve", "problem"), [
    ({"proxy_location": "Disabled"}, "spec.serveConfigV2.proxy_location: Disabled starts no HTTP proxy"),
    ({"http_options": {"port": 8001}}, ("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.ports[serve]: "
                                       "containerPort 8000 but spec.serveConfigV2.http_options.port is 8001")),
    ({"http_options": {"host": "127.0.0.1"}}, "spec.serveConfigV2.http_options.host: '127.0.0.1' binds the proxy"),
])
def test_the_serve_service_must_reach_a_proxy(serve, problem):
    errs = _serve_errors({**_app("no_such_vendor.app:build"), **serve})
    assert any(e.startswith(problem) for e in errs), errs
