"""Which output token the client's TTFT waits for, measured from the bench's per-request records.

Owns ``first_text`` (``EngineModel.empty_first_share``): over the ``kvserve bench --per-request`` results of
token-id prompt workloads (``/v1/completions``: the workload's ``api``), the share of successful requests whose first
chunk with ``choices`` came before their first chunk with text (``first_chunk_s < ttft_s``: the first token decoded to
no text, so the TTFT is a later token's), with one row per result. Chat workloads are left out: their stream's first
chunk carries the role and no text whatever the token, and the ingress's own stamps show their first token reaching
the client at once. A property of the served model (dummy weights here), measured on the GPU host, not fitted.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.simulator.client_fit import bench_docs


def first_text(paths: list[str]) -> dict:
    """``empty_first_share`` over every per-request bench result under ``paths`` (JSONs or log archives) of a token-id
    workload, and each result's row; ValueError if none holds such records."""
    rows = {}
    for p in paths:
        for name, doc in bench_docs(Path(p)):
            if not isinstance(doc, dict) or not doc.get("requests"):
                continue
            workload = (doc.get("config") or {}).get("workload") or {}
            if workload.get("api") != "completions":
                continue
            ok = [r for r in doc["requests"] if r.get("ok") and r.get("ttft_s") is not None
                  and r.get("first_chunk_s") is not None and (r.get("output_tokens") or 0) > 1]
            if ok:
                empty = sum(1 for r in ok if r["first_chunk_s"] < r["ttft_s"])
                # a result found in several archives counts once (its timings tell runs of one cell apart)
                key = (name, len(ok), round(sum(r["ttft_s"] for r in ok), 6))
                rows[key] = {"cell": name.removesuffix(".json"), "workload": workload.get("name"), "requests": len(ok),
                             "empty_first": empty, "share": round(empty / len(ok), 4)}
    if not rows:
        raise ValueError(f"no per-request bench records of a /v1/completions workload under {paths} "
                         "(run.py --per-request)")
    out = [rows[k] for k in sorted(rows)]
    requests, empty = sum(r["requests"] for r in out), sum(r["empty_first"] for r in out)
    return {"empty_first_share": round(empty / requests, 4), "requests": requests, "rows": out}
