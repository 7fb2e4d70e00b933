"""The ingress's CPU costs, fitted from what the GPU host measured of each ingress replica's event loop.

Owns ``ingress_rows`` (one row per cell of a routing head-to-head JSON whose evidence has ``host_cpu``: the mean,
over the cell's ingress processes, of their busiest thread's cores, which is the replica's asyncio loop, against
the requests and output tokens per second each ingress carried) and ``fit_ingress`` (``client_fit.nonnegative_fit``)::

    loop_cores = background + per_request * requests_per_s + per_token * output_tok_per_s   (per ingress)

``background`` is the share of the core the loop spends whatever the load (Serve's control loop, metrics, health
checks); the simulator's ingress core (``EngineModel.frontend_s_*``, processor sharing) has the rest, so its costs are
the per-request and per-token ones over ``1 - background``. Set before the routing fit and not moved by it, as the
client's are: measured on the GPU host, not fitted to latency.

Also ``tree_call_costs``: how long each synchronous call of Ray's router to its tree actor holds the ingress's loop
(``EngineModel.tree_call_s`` + ``tree_call_s_per_ktok``), fitted from ``benchmarks.routing_h2h.ray_tree_cost``'s
actor timings (the match and the insert through ``ray.get``, per workload) against each workload's mean prompt in
tokens (its characters: one per token).

And ``tokenize_hold``: how long the ingress's loop is held tokenising a chat prompt inline
(``EngineModel.tokenize_hold_s``), from py-spy profiles of the GPU runs' ingresses (its loop thread's time in the
tokenizer per request).

And ``ray_reply``: how long after its replica has taken a request Serve has the reply to the send
(``EngineModel.ray_reply_s``), from the GPU's own decision-to-insert times of Ray's router (each cell's
``evidence.ray_router_ms.routed``, the head-to-head's ``--ray-trace`` adapter): their mean over every decision of
every such cell, less the twin's own decision-to-take time at an idle replica (its front end, ``input_s``).
"""

from __future__ import annotations

from collections.abc import Iterator

from benchmarks.routing_h2h.summary import workload_names
from benchmarks.simulator.client_fit import fit_errors, nonnegative_fit

COLUMNS = ("one", "requests_per_s", "output_tok_per_s")
#: The engine fields ``fit_ingress`` sets (and the routing fit then leaves alone).
FIELDS = ("frontend_s_per_request", "frontend_s_per_token")


def _cells(doc: dict) -> Iterator[tuple[str, dict]]:
    """``("system/workload/load", cell)`` for every cell of a routing JSON (``results[system][workload][load]``), sorted
    by system, workload and load."""
    for system, res in sorted(doc.get("results", {}).items()):
        for workload in workload_names(res):
            for load, m in sorted((res.get(workload) or {}).items()):
                if isinstance(m, dict):
                    yield f"{system}/{workload}/{load}", m


def ingress_rows(doc: dict) -> list[dict]:
    """Every cell of a routing JSON with ingress processes in its ``evidence.host_cpu`` (``_cells``' order)."""
    rows = []
    for cell, m in _cells(doc):
        if not m.get("requests_per_s"):
            continue
        procs = [p for p in ((m.get("evidence") or {}).get("host_cpu") or {}).get("processes", [])
                 if p.get("role") == "ingress" and p.get("busiest_thread_cores") is not None]
        if not procs:
            continue
        n = len(procs)
        rows.append({"cell": cell, "ingresses": n, "one": 1.0,
                     "requests_per_s": round(float(m["requests_per_s"]) / n, 3),
                     "output_tok_per_s": round(float(m["output_tok_per_s"]) / n, 1),
                     "loop_cores": round(sum(p["busiest_thread_cores"] for p in procs) / n, 4)})
    return rows


def fit_ingress(rows: list[dict]) -> dict:
    """``background``, ``per_request_s`` and ``per_token_s`` of one ingress's loop by least squares over ``rows``, the
    simulator's costs (``frontend_s_per_request``, ``frontend_s_per_token``: over ``1 - background``) and each row's
    fit."""
    if len(rows) < len(COLUMNS):
        raise ValueError(f"the ingress fit needs at least {len(COLUMNS)} cells with host_cpu evidence")
    coef = nonnegative_fit(rows, COLUMNS, "loop_cores")
    background = coef["one"]
    if background >= 1:
        raise ValueError(f"the ingress loop's background load is {background:.2f} of its core: nothing left to model")
    pred, max_abs, rms = fit_errors(rows, coef, "loop_cores")
    return {"background": round(background, 4), "per_request_s": round(coef["requests_per_s"], 7),
            "per_token_s": round(coef["output_tok_per_s"], 9),
            "frontend_s_per_request": round(coef["requests_per_s"] / (1 - background), 7),
            "frontend_s_per_token": round(coef["output_tok_per_s"] / (1 - background), 9),
            "rows": [dict(x, fit_loop_cores=round(p, 3)) for x, p in zip(rows, pred)],
            "max_abs_error_cores": round(max_abs, 3), "rms_error_cores": round(rms, 3)}


TREE_FIELDS = ("tree_call_s", "tree_call_s_per_ktok")
#: The frame py-spy names for the tokenizer's encode (transformers' fast tokenizer, its Rust call inside)
TOKENIZE_FRAME = "TokenizersBackend._encode_plus"


def tokenize_hold(doc: dict) -> dict:
    """``tokenize_hold_s``: how long an ingress's event loop is held tokenising one chat prompt, from a routing JSON's
    py-spy profiles (``evidence.profile``, ``run.py --profile``) of a chat workload's cells (multiturn): per ingress
    process, its loop thread's self time in the tokenizer's encode frame (``TOKENIZE_FRAME``; its samples over the
    profile's ``rate_hz``) over the requests it carried; their mean, and each process's row (ms)."""
    rows = []
    for cell, m in _cells(doc):
        prof = (m.get("evidence") or {}).get("profile") or {}
        procs = [p for p in prof.get("processes", []) if p.get("role") == "ingress"]
        timed = prof.get("seconds") and prof.get("rate_hz")  # py-spy's; the in-process sampler's has no rate
        if "/multiturn/" not in cell or not timed or not m.get("requests_per_s") or not procs:
            continue
        rps = float(m["requests_per_s"]) / len(procs)
        for p in procs:
            loop = next((t for t in p.get("threads", []) if "AsyncIO Thread" in t.get("thread", "")), None)
            if loop is None:
                continue
            share = sum(x for name, x in loop.get("top_self", []) if name.startswith(TOKENIZE_FRAME))
            cores = share * p["samples"] / prof["rate_hz"] / prof["seconds"]
            rows.append({"cell": cell, "pid": p.get("pid"), "loop_tokenize_cores": round(cores, 4),
                         "requests_per_s": round(rps, 3), "ms": round(cores / rps * 1e3, 3)})
    if not rows:
        raise ValueError("no multiturn cell with a py-spy profile of its ingresses (run.py --profile multiturn:sat)")
    return {"tokenize_hold_s": round(sum(r["ms"] for r in rows) / len(rows) / 1e3, 6), "rows": rows,
            "machine": doc.get("machine"), "git_commits": doc.get("git_commits")}


def tree_call_costs(doc: dict) -> dict:
    """``tree_call_s`` and ``tree_call_s_per_ktok`` by least squares (``nonnegative_fit``) over a ``ray_tree_cost``
    JSON's actor p50s of ``prefix_match`` and ``insert`` per workload, and each row's fit (ms)."""
    rows = [{"call": f"{wl}/{call}", "one": 1.0, "ktok": r["prompt_chars_mean"] / 1e3, "ms": r["actor"][call]["p50"]}
            for wl, r in sorted(doc.get("results", {}).items()) for call in ("prefix_match", "insert")
            if call in (r.get("actor") or {})]
    if len(rows) < 2 or len({x["ktok"] for x in rows}) < 2:
        raise ValueError("the tree-call fit needs the actor timings of at least two prompt lengths")
    coef = nonnegative_fit(rows, ("one", "ktok"), "ms")
    pred, max_abs, rms = fit_errors(rows, coef, "ms")
    return {"tree_call_s": round(coef["one"] / 1e3, 7), "tree_call_s_per_ktok": round(coef["ktok"] / 1e3, 8),
            "rows": [dict(x, fit_ms=round(p, 3)) for x, p in zip(rows, pred)],
            "max_abs_error_ms": round(max_abs, 3), "rms_error_ms": round(rms, 3),
            "source": {k: doc.get(k) for k in ("command", "git_commit", "machine")}}


def ray_reply(doc: dict, taken_s: float) -> dict:
    """``ray_reply_s`` from a routing head-to-head JSON's ``routed`` timings (module docstring): the decision-weighted
    mean of its cells' ``routed`` means less ``taken_s``, at least 0; each cell's count and mean (ms)."""
    rows = []
    for cell, m in _cells(doc):
        routed = ((m.get("evidence") or {}).get("ray_router_ms") or {}).get("routed")
        if routed and routed.get("n"):
            rows.append({"cell": cell, "n": int(routed["n"]), "mean_ms": float(routed["mean"]),
                         "p50_ms": routed.get("p50")})
    if not rows:
        raise ValueError("no cell of Ray's router with its decision-to-insert times (run the head-to-head with "
                         "--ray-trace)")
    mean_ms = sum(r["n"] * r["mean_ms"] for r in rows) / sum(r["n"] for r in rows)
    return {"ray_reply_s": round(max(mean_ms / 1e3 - taken_s, 0.0), 6), "routed_mean_ms": round(mean_ms, 3),
            "taken_s": taken_s, "rows": rows}
