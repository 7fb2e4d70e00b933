"""Offline validation of custom resources against their CRDs' OpenAPI v3 schemas, as the API server would.

Owns: ``CrdSchemas`` (loads ``*.yaml`` CRDs from a schema directory; one schema per group/version/kind)
and ``validate_custom``. Before checking, it does what the API server does on create:
  1. prune ``null`` values of fields that are not ``nullable`` (the server drops them);
  2. apply ``default``s of absent properties inside objects that are present;
then validates with jsonschema (Draft 2020-12) in strict mode: every object schema that lists
``properties`` and neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields``
rejects unknown keys (the server prunes them silently, which hides typos such as ``minReplica``).
CEL rules (``x-kubernetes-validations``) are not evaluated here; the operator-side rules that matter
are reimplemented in ``rules.py``.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

logger = logging.getLogger(__name__)

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: Where the schemas live relative to the repository root (shipped verbatim; sources in its README.md).
DEFAULT_SCHEMA_DIR = Path("kuberay") / "schemas"


def _strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema that rejects unknown keys (structural-schema semantics)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-validations")}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable") and "type" in out and isinstance(out["type"], str):
        out["type"] = [out["type"], "null"]
    return out


def apply_defaults_and_prune(obj: Any, schema: dict[str, Any]) -> Any:
    """Return obj with non-nullable nulls removed and schema defaults filled in (in place on a copy)."""
    if isinstance(obj, dict) and schema.get("type", "object") == "object":
        props = schema.get("properties", {})
        for key in list(obj):
            sub = props.get(key) or (schema.get("additionalProperties") if isinstance(
                schema.get("additionalProperties"), dict) else None)
            if obj[key] is None and not (sub or {}).get("nullable"):
                del obj[key]
            elif sub is not None:
                obj[key] = apply_defaults_and_prune(obj[key], sub)
        for key, sub in props.items():
            if key not in obj and "default" in sub:
                obj[key] = apply_defaults_and_prune(copy.deepcopy(sub["default"]), sub)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults_and_prune(item, schema["items"]) for item in obj]
    return obj


def _path(parts: Any) -> str:
    return ".".join(str(p) for p in parts) or "<root>"


def _header(path: Path) -> tuple[str, str] | None:
    """(group, kind) of a CRD file from its first lines, without parsing the (megabyte) schema."""
    with path.open() as f:
        head = f.read(4096)
    if "kind: CustomResourceDefinition" not in head:
        return None
    group = re.search(r"^  group: (\S+)$", head, re.MULTILINE)
    kind = re.search(r"^    kind: (\S+)$", head, re.MULTILINE)
    return (group.group(1), kind.group(1)) if group and kind else None


class CrdSchemas:
    """OpenAPI schemas of the CRDs in one directory (and its direct subfolders), keyed by (apiVersion, kind).

    Files are indexed by a header scan and parsed on first use, so validating a RayService does not
    pay for parsing the RayJob CRD.
    """

    def __init__(self, schema_dir: Path) -> None:
        self.schema_dir = schema_dir
        if not schema_dir.is_dir():
            raise FileNotFoundError(f"CRD schema directory {schema_dir} does not exist")
        self._files: dict[tuple[str, str], Path] = {}
        # Only one level down: version subfolders (kuberay/v1.5.2/) are loaded by their own CrdSchemas.
        for path in sorted(schema_dir.glob("*.yaml")) + sorted(schema_dir.glob("*/*.yaml")):
            key = _header(path)
            if key is not None:
                self._files.setdefault(key, path)
        self._raw: dict[tuple[str, str], dict[str, Any]] = {}
        self._validators: dict[tuple[str, str], Draft202012Validator] = {}

    def _load(self, group: str, kind: str) -> None:
        path = self._files.get((group, kind))
        if path is None or any(k[1] == kind and k[0].startswith(group + "/") for k in self._raw):
            return
        for doc in yaml.load_all(path.read_text(), Loader=_Loader):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                spec = doc["spec"]
                for v in spec["versions"]:
                    if v.get("served", True) and "schema" in v:
                        self._raw[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = \
                            v["schema"]["openAPIV3Schema"]
        logger.debug("loaded CRD %s from %s", kind, path)

    def kinds(self) -> list[tuple[str, str]]:
        """(group, kind) pairs with a CRD file."""
        return sorted(self._files)

    def has(self, api_version: str, kind: str) -> bool:
        """Whether a schema exists for this apiVersion and kind."""
        self._load(api_version.split("/")[0], kind)
        return (api_version, kind) in self._raw

    def _validator(self, api_version: str, kind: str) -> Draft202012Validator:
        key = (api_version, kind)
        if key not in self._validators:
            self._validators[key] = Draft202012Validator(_strict(self._raw[key]))
        return self._validators[key]

    def validate(self, doc: dict[str, Any]) -> list[str]:
        """Error messages ("path: message") of one custom resource; empty when it is valid."""
        key = (doc.get("apiVersion", ""), doc.get("kind", ""))
        if not self.has(*key):
            return [f"no CRD schema for {key[0]} {key[1]} in {self.schema_dir}"]
        obj = apply_defaults_and_prune(copy.deepcopy(doc), self._raw[key])
        errors = sorted(self._validator(*key).iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
        return [f"{_path(e.absolute_path)}: {e.message}" for e in errors]


@functools.cache
def load_schemas(schema_dir: str) -> CrdSchemas:
    """Cached CrdSchemas for a directory."""
    return CrdSchemas(Path(schema_dir))
