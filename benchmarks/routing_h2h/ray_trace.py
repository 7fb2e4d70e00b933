"""What Ray's router decided, one line per decision, summarised per cell.

Owns ``read`` (the ``ray-router-<pid>.jsonl`` files ``ray_router.RayPrefixCacheAffinity`` writes with ``trace_dir``: one
per ingress process) and ``summarise`` (pure: the decisions of a time window -> how many had a single candidate, how
many were made while other requests waited for a routing task and how often those went where the previous decision
of the same ingress went, the longest run of one ingress's consecutive decisions to one replica, and the decisions
per replica in each ``interval_s``). ``routing_h2h.run --ray-trace`` puts the summary in each cell's evidence
(``ray_trace``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def read(trace_dir: Path) -> dict[str, list[dict]]:
    """Every decision line by ingress (its file's name); a line cut short by a stop is skipped."""
    out: dict[str, list[dict]] = {}
    for path in sorted(Path(trace_dir).glob("ray-router-*.jsonl")):
        lines = []
        for raw in path.read_text().splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
        out[path.stem] = lines
    return out


def summarise(by_ingress: dict[str, list[dict]], t0: float, t1: float, interval_s: float = 5.0) -> dict:
    """The decisions made in ``[t0, t1)`` (module docstring)."""
    window = {ing: sorted((d for d in lines if t0 <= d["t"] < t1), key=lambda d: d["t"])
              for ing, lines in by_ingress.items()}
    decisions = [d for lines in window.values() for d in lines]
    if not decisions:
        return {"decisions": 0}
    waiting = same = longest = 0
    for lines in window.values():
        run, prev = 0, None
        for d in lines:
            run = run + 1 if d["chosen"] == prev else 1
            longest = max(longest, run)
            if d.get("waiting", 0) > 0:
                waiting += 1
                same += d["chosen"] == prev
            prev = d["chosen"]
    bins: dict[int, Counter] = {}
    for d in decisions:
        bins.setdefault(int((d["t"] - t0) // interval_s), Counter())[d["chosen"]] += 1
    replicas = sorted({d["chosen"] for d in decisions if d["chosen"]})
    return {"decisions": len(decisions),
            "one_candidate_share": round(sum(len(d["candidates"]) == 1 for d in decisions) / len(decisions), 3),
            "decided_while_others_waited": waiting,
            "same_replica_as_previous_while_waiting": round(same / waiting, 3) if waiting else None,
            "longest_run_to_one_replica": longest,
            "replicas": replicas, "interval_s": interval_s,
            "by_interval": [[bins.get(i, Counter())[r] for r in replicas] for i in range(max(bins) + 1)]}
