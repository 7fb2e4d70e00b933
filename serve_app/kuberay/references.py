"""What a pod spec refers to outside itself, checked against the set of documents being validated.

Owns: ``check_references`` (the ServiceAccount, PersistentVolumeClaims, Secrets and ConfigMaps a pod
names, through volumes, projected volumes, ``env[].valueFrom`` and ``envFrom``, must be among the
documents, and a Secret/ConfigMap key it reads must be in the object, unless the reference is
``optional``), ``tolerates`` (the Kubernetes scheduler's toleration/taint match: key, value unless the
operator is Exists, effect unless the toleration leaves it empty) and ``check_toleration``.
Documents are looked up in an index keyed by (kind, namespace, name), as crosscheck.py builds it.
"""

from __future__ import annotations

from typing import Any


def _references(pod: dict[str, Any]) -> list[tuple[str, str, str | None, bool, str]]:
    """(kind, name, key or None, optional, field path) of every object a pod spec names."""
    out: list[tuple[str, str, str | None, bool, str]] = []
    if pod.get("serviceAccountName"):
        out.append(("ServiceAccount", pod["serviceAccountName"], None, False, "serviceAccountName"))
    for v in pod.get("volumes", []):
        vw = f"volumes[{v.get('name')}]"
        if (claim := (v.get("persistentVolumeClaim") or {}).get("claimName")):
            out.append(("PersistentVolumeClaim", claim, None, False, f"{vw}.persistentVolumeClaim.claimName"))
        sources = [(vw, v)] + [(f"{vw}.projected.sources.{i}", src)
                               for i, src in enumerate((v.get("projected") or {}).get("sources") or [])]
        for sw, src in sources:
            if (sec := src.get("secret")) and (sec.get("secretName") or sec.get("name")):
                field = "secretName" if "secretName" in sec else "name"
                out.append(("Secret", sec[field], None, bool(sec.get("optional")), f"{sw}.secret.{field}"))
            if (cm := src.get("configMap")) and cm.get("name"):
                out.append(("ConfigMap", cm["name"], None, bool(cm.get("optional")), f"{sw}.configMap.name"))
    for field in ("initContainers", "containers"):
        for c in pod.get(field) or []:
            cw = f"{field}[{c.get('name')}]"
            for e in c.get("env") or []:
                source = e.get("valueFrom") or {}
                for ref, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    if (r := source.get(ref)) and r.get("name"):
                        out.append((kind, r["name"], r.get("key"), bool(r.get("optional")),
                                    f"{cw}.env[{e.get('name')}].valueFrom.{ref}"))
            for i, e in enumerate(c.get("envFrom") or []):
                for ref, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                    if (r := e.get(ref)) and r.get("name"):
                        out.append((kind, r["name"], None, bool(r.get("optional")), f"{cw}.envFrom.{i}.{ref}"))
    return out


def check_references(where: str, pod: dict[str, Any], ns: str, index: dict) -> list[str]:
    """Objects a pod names must be among the documents (and hold the key it reads), unless optional."""
    errs = []
    for kind, name, key, optional, path in _references(pod):
        obj = index.get((kind, ns, name))
        if obj is None and not optional:
            errs.append(f"{where}: {path}: {kind} {ns}/{name} is not among the documents (define it, or mark the "
                        "reference optional: true if the pod may start without it)")
        elif obj is not None and key is not None and not optional:
            keys = {k for f in ("data", "stringData", "binaryData") for k in (obj.get(f) or {})}
            if key not in keys:
                errs.append(f"{where}: {path}: {kind} {ns}/{name} has no key {key!r} (keys {sorted(keys)})")
    return errs


def tolerates(toleration: dict[str, Any], taint: dict[str, Any]) -> bool:
    """Whether a pod toleration tolerates a node taint, as the Kubernetes scheduler decides it."""
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    exists = toleration.get("operator", "Equal") == "Exists"
    if not toleration.get("key"):
        return exists  # an empty key with Exists tolerates every taint
    if toleration["key"] != taint.get("key"):
        return False
    return exists or str(toleration.get("value", "")) == str(taint.get("value", ""))


def _taint(taint: dict[str, Any]) -> str:
    value = f"={taint['value']}" if taint.get("value") not in (None, "") else ""
    return f"{taint.get('key')}{value}:{taint.get('effect')}"


def check_toleration(where: str, tolerations: list[dict[str, Any]], taint: dict[str, Any], owner: str) -> list[str]:
    """A message when no toleration tolerates a taint of the nodes the pod must land on (owner names them)."""
    if any(tolerates(t, taint) for t in tolerations):
        return []
    near = [t for t in tolerations if t.get("key") == taint.get("key")]
    hint = (f"; its tolerations for {taint.get('key')} are {near} (the effect must match, and operator Equal "
            f"needs value {taint.get('value', '')!r}; Exists ignores the value)") if near else ""
    return [f"{where}: does not tolerate taint {_taint(taint)} of {owner}{hint}"]
