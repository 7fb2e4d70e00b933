"""The load generator's CPU costs, fitted from what each GPU cell's client measured of itself.

Owns ``client_rows`` (one row per distinct ``kvserve bench`` result: its measured phase's wall
seconds, requests and output tokens, and the client process's CPU seconds over that phase,
``summary.client.cpu_s``; read by ``bench_docs``, which ``text_fit`` shares) and ``fit_client`` (non-negative least
squares through the origin)::

    cpu_s = background * duration_s + per_request * requests + per_token * output_tokens

``background`` is the share of the core the loop spends whatever the load (timers, polling, the
scheduler): it shows in the lightly loaded cells, whose CPU is well above their requests' work. The
simulator's client core (``EngineModel.client_s_*``) has the rest, so its costs are the per-request and
per-token ones over ``1 - background``. The rows come from the bench JSONs a routing head-to-head
leaves beside its result (``.json`` files, or the ``.tgz`` log archives of ``benchmarks/results/logs``,
read in place); a result found in several archives counts once. Measured on the GPU host, not fitted
to latency.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path


def bench_docs(path: Path, member_paths: bool = False):
    """(file name, JSON document) of ``path`` (a ``.json``) or of every JSON file inside it (a ``.tgz`` archive); with
    ``member_paths``, an archive's files are named by their path in it (``work/r25_a/CELL.json``), so the same cell of
    two runs in one archive keeps both."""
    if path.suffix == ".json":
        yield path.name, json.loads(path.read_text())
        return
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".json"):
                name = member.name.removeprefix("./") if member_paths else Path(member.name).name
                yield name, json.load(tar.extractfile(member))


def client_rows(paths: list[str]) -> list[dict]:
    """Every bench result under ``paths`` that recorded its client's CPU, once each, sorted by name."""
    rows = {}
    for p in paths:
        for name, doc in bench_docs(Path(p)):
            summary = doc.get("summary") if isinstance(doc, dict) else None
            cpu = ((summary or {}).get("client") or {}).get("cpu_s")
            if cpu is None:
                continue
            req, tok = summary["requests"], summary["tokens"]
            row = {"cell": name.removesuffix(".json"), "duration_s": round(float(summary["duration_s"]), 3),
                   "requests": int(req["issued"]), "output_tokens": int(tok["output_total"]),
                   "cpu_s": round(float(cpu), 4), "cpu_util": round(float(summary["client"].get("cpu_util", 0.0)), 4)}
            rows[(row["cell"], row["cpu_s"])] = row
    return [rows[k] for k in sorted(rows)]


COLUMNS = ("duration_s", "requests", "output_tokens")


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting; ValueError if singular."""
    n = len(b)
    m = [row[:] + [v] for row, v in zip(a, b)]
    for i in range(n):
        p = max(range(i, n), key=lambda r: abs(m[r][i]))
        if abs(m[p][i]) < 1e-12 * max(1.0, max(abs(x) for x in m[p][:n])):
            raise ValueError("the columns are collinear across the rows: the costs cannot be separated")
        m[i], m[p] = m[p], m[i]
        for r in range(i + 1, n):
            f = m[r][i] / m[i][i]
            m[r] = [x - f * y for x, y in zip(m[r], m[i])]
    out = [0.0] * n
    for i in reversed(range(n)):
        out[i] = (m[i][n] - sum(m[i][j] * out[j] for j in range(i + 1, n))) / m[i][i]
    return out


def nonnegative_fit(rows: list[dict], columns: tuple[str, ...], target: str) -> dict[str, float]:
    """Least squares through the origin of ``row[target]`` on ``row[c]`` for ``c`` in ``columns``; a coefficient that
    comes out negative is dropped (0) and the rest refitted. ValueError when every one is dropped."""
    y = [float(x[target]) for x in rows]
    cols = list(columns)
    while True:
        xs = [[float(x[c]) for c in cols] for x in rows]
        ata = [[sum(r[i] * r[j] for r in xs) for j in range(len(cols))] for i in range(len(cols))]
        aty = [sum(r[i] * v for r, v in zip(xs, y)) for i in range(len(cols))]
        coef = dict(zip(cols, _solve(ata, aty)))
        negative = [c for c in cols if coef[c] < 0]
        if not negative:
            return {c: coef.get(c, 0.0) for c in columns}
        cols.remove(min(negative, key=lambda c: coef[c]))
        if not cols:
            raise ValueError(f"no non-negative coefficients of {list(columns)} fit these rows")


def fit_errors(rows: list[dict], coef: dict[str, float], target: str) -> tuple[list[float], float, float]:
    """Each row's fitted ``target`` (``coef`` over the rows' columns), and the fit's largest and rms error."""
    pred = [sum(c * float(x[k]) for k, c in coef.items()) for x in rows]
    errors = [p - float(x[target]) for p, x in zip(pred, rows)]
    return pred, max(abs(e) for e in errors), (sum(e * e for e in errors) / len(errors)) ** 0.5


def fit_client(rows: list[dict], cores: int = 1) -> dict:
    """``background``, ``per_request`` and ``per_token`` by least squares over ``rows`` (``nonnegative_fit``), the
    simulator's costs (``client_s_per_request``, ``client_s_per_token``: over what the background leaves of each of
    the ``cores`` bench processes the rows' CPU seconds were summed over, ``1 - background / cores``) and each row's
    fit."""
    if len(rows) < len(COLUMNS):
        raise ValueError(f"the client fit needs at least {len(COLUMNS)} bench results with client.cpu_s")
    coef = nonnegative_fit(rows, COLUMNS, "cpu_s")
    background = coef["duration_s"]
    if background >= cores:
        raise ValueError(f"the client's background load is {background:.2f} cores over {cores}: nothing left to model")
    share = 1 - background / cores
    pred, max_abs, rms = fit_errors(rows, coef, "cpu_s")
    return {"background": round(background, 6), "per_request_s": round(coef["requests"], 9),
            "per_token_s": round(coef["output_tokens"], 11),
            "cores": cores, "client_s_per_request": round(coef["requests"] / share, 9),
            "client_s_per_token": round(coef["output_tokens"] / share, 11),
            "rows": [dict(x, fit_cpu_s=round(p, 3)) for x, p in zip(rows, pred)],
            "max_abs_error_s": round(max_abs, 3), "rms_error_s": round(rms, 3)}
