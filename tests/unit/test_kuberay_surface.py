"""The cluster surface of the rendered RayServices: Ray token authentication, NetworkPolicies, the API-key and
hash-seed Secrets, and the KV-event sockets."""

from __future__ import annotations

import copy

import pytest
import yaml

from serve_app.config import ConfigError, RoutingConfig, load_app_config
from serve_app.kuberay import render
from serve_app.kuberay.crosscheck import cross_check
from serve_app.kuberay.network import SecuritySpec, secret_env
from serve_app.kuberay.rules_serve import serve_config_rules

pytestmark = pytest.mark.unit

ROOT = render.repo_root()
FILES = sorted((ROOT / "kuberay").glob("rayservice-*.yaml"))


def _docs(path) -> tuple[dict, dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    (rs,) = [d for d in docs if d["kind"] == "RayService"]
    (np_,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    return rs, np_


def _templates(rs: dict) -> list[dict]:
    rcc = rs["spec"]["rayClusterConfig"]
    return [rcc["headGroupSpec"]["template"]] + [g["template"] for g in rcc["workerGroupSpecs"]]


def _problems(rs: dict, *others: dict) -> list[str]:
    _, apps = serve_config_rules(rs)
    return [m for _, m in cross_check([rs, *others], {rs["metadata"]["name"]: apps}, "2.60.0")
            if "is not among the documents" not in m]  # the ServiceAccount/PVC live in common.yaml


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_ray_token_authentication_is_on_for_every_pod(path):
    rs, _ = _docs(path)
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}  # KubeRay makes the Secret
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] >= "2.52"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_the_network_policy_opens_each_port_only_to_who_needs_it(path):
    rs, np_ = _docs(path)
    name = rs["metadata"]["name"]
    own = {"matchLabels": {"app.kubernetes.io/name": "kvserve", "app.kubernetes.io/instance": name}}
    assert np_["metadata"]["namespace"] == rs["metadata"]["namespace"]
    assert np_["spec"]["podSelector"] == own and np_["spec"]["policyTypes"] == ["Ingress"]
    for tpl in _templates(rs):  # every pod of the target is selected
        assert own["matchLabels"].items() <= tpl["metadata"]["labels"].items()
    rules = {tuple(p["port"] for p in r.get("ports", [])): r["from"] for r in np_["spec"]["ingress"]}
    assert rules[()] == [{"podSelector": own}]  # all ports (GCS, client, KV events) only from its own pods
    assert rules[(8265,)] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
                               "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    assert rules[(8000,)] == [{"ipBlock": {"cidr": "10.0.0.0/16"}}]
    assert rules[(8080, 44217, 44227)] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert set(rules) == {(), (8265,), (8000,), (8080, 44217, 44227)}  # 6379 and 10001 are in no other rule


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_api_keys_come_from_a_mounted_secret_and_never_from_the_manifest(path):
    rs, _ = _docs(path)
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["auth"] == {"enabled": True, "api_keys_path": "/etc/kvserve/api-keys"}
    for tpl in _templates(rs):
        spec = tpl["spec"]
        assert {"name": "api-keys", "secret": {"secretName": "kvserve-api-keys", "optional": True}} in spec["volumes"]
        assert {"name": "api-keys", "mountPath": "/etc/kvserve/api-keys", "readOnly": True} in \
            spec["containers"][0]["volumeMounts"]
    assert "sk-" not in path.read_text() and "RAY_AUTH_TOKEN" not in path.read_text()


def test_the_gpu_targets_take_the_hash_seed_from_a_secret():
    rs, _ = _docs(ROOT / "kuberay" / "rayservice-llama8b.yaml")
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["routing"]["hash_seed_from_env"] is True
    for tpl in _templates(rs):
        (seed,) = [e for e in tpl["spec"]["containers"][0]["env"] if e["name"] == "PYTHONHASHSEED"]
        assert seed == {"name": "PYTHONHASHSEED", "valueFrom": {"secretKeyRef": {
            "name": "kvserve-hash-seed", "key": "seed", "optional": True}}}


def test_the_shipped_set_passes_and_each_hole_is_reported():
    rs, np_ = _docs(ROOT / "kuberay" / "rayservice-cpu-smoke.yaml")
    assert _problems(rs, np_) == []
    assert any("no NetworkPolicy in namespace kvserve selects these pods" in m for m in _problems(rs))
    other = copy.deepcopy(np_)
    other["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] = "someone-else"
    assert len([m for m in _problems(rs, other) if "no NetworkPolicy" in m]) == len(_templates(rs))
    off = copy.deepcopy(rs)
    off["spec"]["rayClusterConfig"]["authOptions"] = {"mode": "disabled"}
    assert "rayClusterConfig.authOptions.mode is 'disabled': the GCS, dashboard and agents accept unauthenticated " \
           "calls (set mode: token)" in _problems(off, np_)
    old = copy.deepcopy(rs)
    old["spec"]["rayClusterConfig"]["rayVersion"] = "2.49.0"
    assert "rayClusterConfig.authOptions.mode token needs rayVersion >= 2.52, got 2.49.0" in \
        [m for _, m in cross_check([old, np_], {}, None)]


def test_a_seed_from_the_environment_is_required_and_never_random(monkeypatch):
    cfg = RoutingConfig(hash_seed_from_env=True)
    monkeypatch.setenv("PYTHONHASHSEED", "12345")
    assert cfg.seed() == "12345" and RoutingConfig(hash_seed="7").seed() == "7"
    for bad in ("", "random"):
        monkeypatch.setenv("PYTHONHASHSEED", bad)
        with pytest.raises(ValueError, match="PYTHONHASHSEED is not set to a seed"):
            cfg.seed()
    apps = [load_app_config({"models": [{"id": "m", "path": "p", "deployment": {"max_ongoing_requests": 1}}],
                             "routing": {"hash_seed_from_env": True}})]
    with pytest.raises(ConfigError, match="cluster.security.hash_seed_secret is not set"):
        secret_env(apps, SecuritySpec(serve_from=[{"ipBlock": {"cidr": "10.0.0.0/16"}}]))


