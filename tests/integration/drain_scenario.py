"""Run by test_drain.py in its own process (it needs a multi-node Ray of its own, beside the session's).

A Serve replica on worker node A holds a ``SLEEP_S``-s request; ``serve_app.drain.drain`` on A must move the
replica to worker node B, let the in-flight request finish on A, and report A empty. Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import ray
from ray import serve
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from serve_app.drain import drain

#: How long the in-flight request runs: the drain must wait for it.
SLEEP_S = 5


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@serve.deployment(ray_actor_options={"num_cpus": 0.1, "resources": {"slot": 1}}, max_ongoing_requests=4,
                  graceful_shutdown_timeout_s=30)
class Slow:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def __call__(self, seconds: int) -> dict:
        await asyncio.sleep(seconds)
        return {"slept_s": seconds, "node": ray.get_runtime_context().get_node_id()}


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "gcs_server_port": _port(),
                                                           "dashboard_port": _port()})
    a = cluster.add_node(num_cpus=1, resources={"slot": 1})
    ray.init(address=cluster.address, logging_level="ERROR")
    serve.start(http_options={"location": "HeadOnly", "port": _port()})
    try:
        h = serve.run(Slow.bind(), name="slow", route_prefix=None)
        before = h.node.remote().result()
        b = cluster.add_node(num_cpus=1, resources={"slot": 1})
        inflight = h.remote(SLEEP_S)
        time.sleep(1)
        t0 = time.monotonic()
        drained, load, _ = drain(60, node_id=a.node_id, address=cluster.address, poll_s=0.5)
        out = {"drained": drained, "left": [load.replicas, load.proxy], "drain_s": round(time.monotonic() - t0, 1),
               "inflight": inflight.result(timeout_s=60), "a": a.node_id, "b": b.node_id, "before": before,
               "after": h.node.remote().result()}
        print(json.dumps(out), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
