"""Kubernetes quantities and the duration formats the manifests use, parsed the way their consumers do.

Owns: ``quantity`` (a Kubernetes resource quantity: "500m", "16Gi", "1e3", 2), ``quantity_bytes``,
``duration_s`` (Karpenter durations such as ``consolidateAfter``: "15m", "1h30m", "Never") and
``go_duration_s`` (Go ``time.ParseDuration``, which KubeRay uses for ``ray.io/initializing-timeout``).
Every parser raises ValueError on text its consumer would reject; none of them rounds.
"""

from __future__ import annotations

import math
import re
from typing import Any

_SUFFIX = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)")
#: Go time.ParseDuration units, in seconds.
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
_GO_DURATION = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")


def quantity(value: Any) -> float:
    """Value of a Kubernetes quantity ("500m" -> 0.5, "16Gi" -> 17179869184.0, 2 -> 2.0)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    m = _QUANTITY.fullmatch(str(value))
    if not m:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, exponent, suffix = m.groups()
    return float(number + exponent) if exponent else float(number) * _SUFFIX[suffix or ""]


def quantity_bytes(value: Any) -> int:
    """Bytes of a memory quantity ("16Gi", "500M", 1024)."""
    return int(quantity(value))


def duration_s(value: str) -> float:
    """Seconds of a Karpenter duration ("15m", "1h30m", "900s", "Never")."""
    if value == "Never":
        return math.inf
    parts = re.findall(r"(\d+)([smh])", value)
    return float(sum(int(n) * {"s": 1, "m": 60, "h": 3600}[u] for n, u in parts))


def go_duration_s(text: str) -> float:
    """Seconds of a Go ``time.ParseDuration`` string ("45m", "1h30m", "1.5h", "300ms", "0")."""
    if text in ("0", "+0", "-0"):
        return 0.0
    if not _GO_DURATION.fullmatch(text):
        raise ValueError(f"not a Go duration: {text!r}")
    total = sum(float(n) * _GO_UNITS[u] for n, u in re.findall(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)", text))
    return -total if text.startswith("-") else total
