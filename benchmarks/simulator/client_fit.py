"""The load generator's CPU costs, fitted from what each GPU cell's client measured of itself.

Owns ``client_rows`` (one row per distinct ``kvserve bench`` result: its requests, warm-up included,
its output tokens and the client process's CPU seconds, ``summary.client.cpu_s``) and
``fit_client`` (least squares through the origin)::

    cpu_s = client_s_per_request * requests + client_s_per_token * output_tokens

The rows come from the bench JSONs a routing head-to-head leaves beside its result (``.json`` files, or
the ``.tgz`` log archives of ``benchmarks/results/logs``, read in place); a result found in several
archives counts once. The fit is what the simulator's client core costs (``EngineModel.client_s_*``):
measured on the GPU host, not fitted to latency.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path


def _bench_docs(path: Path):
    if path.suffix == ".json":
        yield path.name, json.loads(path.read_text())
        return
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".json"):
                yield Path(member.name).name, json.load(tar.extractfile(member))


def client_rows(paths: list[str]) -> list[dict]:
    """Every bench result under ``paths`` that recorded its client's CPU, once each, sorted by name."""
    rows = {}
    for p in paths:
        for name, doc in _bench_docs(Path(p)):
            summary = doc.get("summary") if isinstance(doc, dict) else None
            cpu = ((summary or {}).get("client") or {}).get("cpu_s")
            if cpu is None:
                continue
            req, tok = summary["requests"], summary["tokens"]
            row = {"cell": name.removesuffix(".json"), "requests": int(req["issued"]) + int(req.get("warmup", 0)),
                   "output_tokens": int(tok["output_total"]), "cpu_s": round(float(cpu), 4),
                   "cpu_util": round(float(summary["client"].get("cpu_util", 0.0)), 4)}
            rows[(row["cell"], row["cpu_s"])] = row
    return [rows[k] for k in sorted(rows)]


def fit_client(rows: list[dict]) -> dict:
    """``client_s_per_request`` and ``client_s_per_token`` by least squares over ``rows`` (normal
    equations of the two-column fit through the origin), each kept >= 0, and the fit's residuals."""
    if len(rows) < 2:
        raise ValueError("the client fit needs at least two bench results with client.cpu_s")
    r = [float(x["requests"]) for x in rows]
    t = [float(x["output_tokens"]) for x in rows]
    y = [float(x["cpu_s"]) for x in rows]
    srr, stt, srt = sum(a * a for a in r), sum(b * b for b in t), sum(a * b for a, b in zip(r, t))
    sry, sty = sum(a * c for a, c in zip(r, y)), sum(b * c for b, c in zip(t, y))
    det = srr * stt - srt * srt
    if det <= 0:
        raise ValueError("requests and output tokens are collinear across the rows: no two-cost fit")
    per_req, per_tok = (sry * stt - sty * srt) / det, (sty * srr - sry * srt) / det
    if per_req < 0:  # the one-column fits
        per_req, per_tok = 0.0, sty / stt
    elif per_tok < 0:
        per_req, per_tok = sry / srr, 0.0
    pred = [per_req * a + per_tok * b for a, b in zip(r, t)]
    return {"client_s_per_request": round(per_req, 7), "client_s_per_token": round(per_tok, 9),
            "rows": [dict(x, fit_cpu_s=round(p, 3)) for x, p in zip(rows, pred)],
            "max_abs_error_s": round(max(abs(p - c) for p, c in zip(pred, y)), 3)}
