"""Offline validation of a set of Kubernetes manifests, in the order the cluster would check them.

Owns: ``load_documents`` and ``validate_documents`` / ``validate_files``, which run
  1. core kinds (v1 ServiceAccount, PersistentVolume(Claim), ConfigMap, Namespace...) through
     ``kubernetes_validate`` in strict mode for one Kubernetes version;
  2. custom resources against their CRD schemas with API-server defaulting and strict keys (crd.py);
  3. operator-only and Karpenter rules (rules.py), and serveConfigV2 strictly against ray.serve.schema
     (rules_serve.py);
  4. cross-document checks over the whole set (crosscheck.py).
Every message names the file, the object (Kind/name) and the field path. Validating a set means
validating it together: names referenced in one file must be defined in one of the others.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from serve_app.kuberay.crd import DEFAULT_SCHEMA_DIR, load_schemas
from serve_app.kuberay.crosscheck import cross_check
from serve_app.kuberay.rules import karpenter_rules, rayservice_rules
from serve_app.kuberay.rules_serve import serve_config_rules

logger = logging.getLogger(__name__)

#: Kubernetes version whose core schemas are used (EKS standard support in 2026 covers 1.32-1.35).
K8S_VERSION = "1.33.0"


@dataclass(frozen=True)
class Problem:
    """One validation failure."""

    source: str
    kind: str
    name: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.kind}/{self.name}: {self.message}"


def default_schema_dir(root: Path | None = None) -> Path:
    """kuberay/schemas in the repository (the CRD schemas it ships)."""
    from serve_app.kuberay.render import repo_root

    return ((root or repo_root()) / DEFAULT_SCHEMA_DIR).resolve()


def load_documents(paths: list[Path]) -> list[tuple[str, dict[str, Any]]]:
    """(source "file#index", document) for every non-empty YAML document; raises ValueError on bad YAML."""
    out = []
    for path in paths:
        try:
            docs = list(yaml.safe_load_all(Path(path).read_text()))
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: cannot read YAML: {err}") from None
        for i, doc in enumerate(docs):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise ValueError(f"{path}#{i}: a manifest must be a mapping, got {type(doc).__name__}")  # noqa: TRY004
            out.append((f"{path}#{i}", doc))
    return out


#: ``_core``'s answers, by document and Kubernetes version, oldest first (at most _CORE_MEMO_SIZE).
_core_memo: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
_CORE_MEMO_SIZE = 256


def _core(doc: dict[str, Any], k8s_version: str) -> list[str]:
    """Problems of one core-kind document, remembered by content.

    kubernetes_validate re-reads and parses its 1.4 MB definitions file for every document, and a set
    is often validated again with most documents unchanged (``render --check``, the kuberay tests'
    broken variants of one set). The key is ``repr(doc)``: it tells apart what ``==``
    does not (1 and True, a date and its string), so only an identical document is answered from memory.
    """
    key = (repr(doc), k8s_version)
    if key not in _core_memo:
        if len(_core_memo) >= _CORE_MEMO_SIZE:
            _core_memo.popitem(last=False)
        _core_memo[key] = _core_check(doc, k8s_version)
    return list(_core_memo[key])


def _core_check(doc: dict[str, Any], k8s_version: str) -> list[str]:
    import kubernetes_validate as kv

    try:
        kv.validate(doc, k8s_version, strict=True)
    except kv.SchemaNotFoundError:
        return [f"no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes {k8s_version}"]
    except kv.ValidationError as err:
        return [f"{'.'.join(map(str, err.absolute_path)) or '<root>'}: {err.message}"]
    return []


def validate_documents(docs: list[tuple[str, dict[str, Any]]], schema_dir: Path | None = None,
                       k8s_version: str = K8S_VERSION, ray_version: str | None = None) -> list[Problem]:
    """Every problem of a set of documents; empty when all are valid."""
    schemas = load_schemas(str(schema_dir or default_schema_dir()))
    problems: list[Problem] = []
    apps_by_service = {}
    source_of = {}
    for source, doc in docs:
        kind, name = doc.get("kind", "?"), doc.get("metadata", {}).get("name", "?")
        source_of[id(doc)] = source
        if schemas.has(doc.get("apiVersion", ""), kind):
            msgs = schemas.validate(doc)
        else:
            msgs = _core(doc, k8s_version)
        if kind == "RayService":
            msgs += rayservice_rules(doc)
            serve_errs, apps = serve_config_rules(doc)
            msgs += serve_errs
            apps_by_service[name] = apps
        elif doc.get("apiVersion", "").startswith("karpenter."):
            msgs += karpenter_rules(doc)
        problems += [Problem(source, kind, name, m) for m in msgs]
    for doc, msg in cross_check([d for _, d in docs], apps_by_service, ray_version):
        problems.append(Problem(source_of[id(doc)], doc.get("kind", "?"), doc["metadata"].get("name", "?"), msg))
    for p in problems:
        logger.debug("%s", p)
    return problems


def validate_files(paths: list[Path], schema_dir: Path | None = None, k8s_version: str = K8S_VERSION,
                   ray_version: str | None = None) -> list[Problem]:
    """Load and validate several manifest files together."""
    return validate_documents(load_documents(paths), schema_dir, k8s_version, ray_version)
