"""kuberay/ is exactly what `kvserve kuberay render` makes of configs/ (the drift test), serveConfigV2 is
the Serve config itself, and the CLI's render/--check/validate behave as documented."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from kuberay_support import copy_inputs, schema_dir_or_skip

from serve_app.config import ConfigError
from serve_app.kuberay import cli, render
from serve_app.kuberay.targets import Target, effective_serve_config, load_targets, merge_patch

pytestmark = pytest.mark.unit

ROOT = render.repo_root()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the inputs (configs/ and the Dockerfile), rendered once."""
    render.write(copy_inputs(tmp_path))
    return tmp_path


def test_kuberay_dir_matches_configs():
    assert render.drift(ROOT) == [], "kuberay/ drifted from configs/: run `kvserve kuberay render`"


def test_render_is_deterministic():
    assert render.render_all(ROOT) == render.render_all(ROOT)


def test_serve_config_v2_is_the_serve_config_with_cluster_overrides():
    spec = load_targets(ROOT / render.TARGETS_FILE)
    for t in spec.targets:
        (rs,) = [d for d in yaml.safe_load_all((ROOT / "kuberay" / t.file).read_text()) if d["kind"] == "RayService"]
        doc, _ = effective_serve_config(t, ROOT)
        assert yaml.safe_load(rs["spec"]["serveConfigV2"]) == doc
        source = yaml.safe_load((ROOT / t.serve_config).read_text())
        assert [a["import_path"] for a in doc["applications"]] == [a["import_path"] for a in source["applications"]]


def test_a_config_change_shows_up_as_drift_and_render_fixes_it(tree):
    assert render.drift(tree) == []
    path = tree / "configs" / "gpu.yaml"
    path.write_text(path.read_text().replace("max_model_len: 16384", "max_model_len: 8192"))
    assert render.drift(tree) == ["kuberay/rayservice-llama8b.yaml"]
    assert render.write(tree) == ["kuberay/rayservice-llama8b.yaml"]
    assert "max_model_len: 8192" in (tree / "kuberay" / "rayservice-llama8b.yaml").read_text()


def test_hand_edits_are_drift(tree):
    path = tree / "kuberay" / "rayservice-llama8b-tp2.yaml"
    path.write_text(path.read_text().replace("maxReplicas: 4", "maxReplicas: 5"))
    assert render.drift(tree) == ["kuberay/rayservice-llama8b-tp2.yaml"]


def test_stale_generated_files_are_removed_and_others_kept(tree):
    stale = tree / "kuberay" / "rayservice-old.yaml"
    stale.write_text(f"{render.GENERATED_MARK} from configs/old.yaml.\n---\n{{}}\n")
    mine = tree / "kuberay" / "extra.yaml"
    mine.write_text("# hand-written\n")
    assert render.drift(tree) == ["kuberay/rayservice-old.yaml"]
    render.write(tree)
    assert not stale.exists() and mine.exists()


def test_ray_version_comes_from_the_dockerfile(tree):
    path = tree / "kuberay" / "Dockerfile"
    path.write_text(path.read_text().replace("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.61.0"))
    assert "kuberay/rayservice-llama8b.yaml" in render.drift(tree)
    path.write_text("FROM scratch\n")
    with pytest.raises(ConfigError, match="no `ARG RAY_VERSION=X.Y.Z` line"):
        render.render_all(tree)


def test_cli_render_check(tree, capsys):
    assert cli.main(["render", "--check", "--root", str(tree)]) == 0
    (tree / "kuberay" / "karpenter.yaml").write_text("# edited\n")
    assert cli.main(["render", "--check", "--root", str(tree)]) == 1
    assert "kuberay/karpenter.yaml" in capsys.readouterr().err


def test_cli_validate(tree, capsys):
    schema_dir_or_skip()  # the CRD schemas ship in kuberay/schemas
    files = [str(p) for p in sorted((ROOT / "kuberay").glob("*.yaml"))]
    assert cli.main(["validate", *files, "--dockerfile", str(ROOT / "kuberay" / "Dockerfile")]) == 0
    broken = tree / "broken.yaml"
    broken.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: 1}\n")
    assert cli.main(["validate", str(broken)]) == 1
    assert "ConfigMap/x: data.a: 1 is not of type 'string'" in capsys.readouterr().err
    broken.write_text("a: [\n")
    assert cli.main(["validate", str(broken)]) == 2


def test_register_adds_the_kuberay_group():
    parser = argparse.ArgumentParser(prog="kvserve")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["kuberay", "render", "--check"])
    assert args.func is cli._render and args.check


def test_merge_patch_follows_rfc_7386():
    base = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1]}
    assert merge_patch(base, {"a": None, "b": {"c": 9}, "e": [2]}) == {"b": {"c": 9, "d": 3}, "e": [2]}
    assert base == {"a": 1, "b": {"c": 2, "d": 3}, "e": [1]}


@pytest.mark.parametrize(("override", "message"), [
    ({"no-such-model": {"dtype": "float16"}}, "model_overrides name unknown model id(s) ['no-such-model']"),
    ({"llama-3.1-8b": {"tensor_parallel_size": 0}}, "tensor_parallel_size: Input should be greater than or equal to 1"),
])
def test_bad_overrides_are_config_errors(override, message):
    target = Target(name="t", file="t.yaml", serve_config="configs/gpu.yaml", image="i", model_overrides=override)
    with pytest.raises(ConfigError) as err:
        effective_serve_config(target, ROOT)
    assert message in str(err.value)


def test_args_overrides_patch_every_application_but_not_models():
    target = Target(name="t", file="t.yaml", serve_config="configs/gpu.yaml", image="i",
                    args_overrides={"kv_tier": {"enabled": True, "budget_gib": 4}})
    _, (app,) = effective_serve_config(target, ROOT)
    assert app.kv_tier.enabled and app.kv_tier.budget_gib == 4
    with pytest.raises(ValueError, match="patch models through model_overrides"):
        Target(name="t", file="t.yaml", serve_config="configs/gpu.yaml", image="i", args_overrides={"models": []})


def test_target_name_is_checked_before_anything_is_written():
    with pytest.raises(ValueError, match="at most 47 characters"):
        Target(name="k" * 48, file="t.yaml", serve_config="configs/gpu.yaml", image="i")


def test_gpu_target_needs_an_accelerator_type(tmp_path):
    from serve_app.kuberay.rayservice import build_target

    spec = load_targets(ROOT / render.TARGETS_FILE)
    target = Target(name="t", file="t.yaml", serve_config="configs/gpu.yaml", image="i")
    with pytest.raises(ConfigError, match="model llama-3.1-8b needs accelerator_type on a GPU target"):
        build_target(target, spec.cluster, ROOT, "2.60.0")


def test_ci_fails_instead_of_skipping_without_the_crd_schemas(monkeypatch, tmp_path):
    import kuberay_support

    monkeypatch.setattr(kuberay_support, "default_schema_dir", lambda: tmp_path / "absent")
    monkeypatch.setenv("KVSERVE_REQUIRE_SCHEMAS", "1")
    with pytest.raises(pytest.fail.Exception, match="CRD schemas not found .*KVSERVE_REQUIRE_SCHEMAS=1"):
        kuberay_support.schema_dir_or_skip()
    monkeypatch.setenv("KVSERVE_REQUIRE_SCHEMAS", "0")
    with pytest.raises(pytest.skip.Exception):
        kuberay_support.schema_dir_or_skip()
