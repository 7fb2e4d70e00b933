"""Pod shutdown: drain this Ray node so in-flight generations finish before the pod stops.

Owns ``kvserve drain``, the preStop hook of every Ray worker pod that ``kvserve kuberay render`` writes.
Kubernetes runs preStop before it sends SIGTERM, and ``ray start --block`` exits on SIGTERM, taking every
replica of the node with it; a grace period alone only delays the SIGKILL. So the hook:

1. asks the GCS to drain this node with a deadline (``ray drain-node``, the call autoscaler v2 makes for
   idle and preempted nodes). Serve then starts replacement replicas elsewhere, stops the replicas here
   gracefully (each waits up to its ``graceful_shutdown_timeout_s`` for its ongoing requests), and puts
   this node's proxy into draining, which fails its health check so ``<name>-serve-svc`` drops the pod;
2. waits until no Serve replica is alive on the node and its proxy, if any, has drained (or the
   deadline passes), then returns and lets Kubernetes stop the container.

The waiting loop (``wait_drained``) is pure; the Ray calls live in ``_RayNode``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Proxy states after which the node's proxy holds no client stream any more.
_PROXY_DONE = {None, "DRAINED", "UNHEALTHY"}


@dataclass(frozen=True)
class NodeLoad:
    """What still runs on the node being drained."""

    replicas: int
    proxy: str | None  # the node's Serve proxy status name, None without a proxy

    @property
    def drained(self) -> bool:
        return self.replicas == 0 and self.proxy in _PROXY_DONE


def wait_drained(probe: Callable[[], NodeLoad], deadline_s: float, *, poll_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> tuple[bool, NodeLoad]:
    """Poll until the node has drained or ``deadline_s`` passed: (drained, last load seen)."""
    end = clock() + deadline_s
    load = probe()
    while not load.drained and clock() < end:
        sleep(min(poll_s, max(0.0, end - clock())))
        load = probe()
    return load.drained, load


class _RayNode:
    """This pod's Ray node, seen through a driver connected to the local raylet."""

    def __init__(self, node_id: str | None = None, address: str = "auto") -> None:
        import ray

        if not ray.is_initialized():
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        self.node_id = node_id or ray.get_runtime_context().get_node_id()
        self.address = ray.get_runtime_context().gcs_address

    def drain(self, deadline_s: int) -> None:
        subprocess.run([_ray_cli(), "drain-node", "--address", self.address, "--node-id", self.node_id,
                        "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                        "--reason-message", "Kubernetes is stopping this pod (preStop)",
                        "--deadline-remaining-seconds", str(deadline_s)], check=True)

    def load(self) -> NodeLoad:
        from ray import serve
        from ray.util.state import list_actors

        actors = list_actors(filters=[("node_id", "=", self.node_id), ("state", "=", "ALIVE")], limit=10_000)
        replicas = sum(1 for a in actors if (a.class_name or "").startswith("ServeReplica"))
        try:
            proxy = serve.status().proxies.get(self.node_id)
        except Exception:  # noqa: BLE001 - no Serve controller (being torn down): no proxy to wait for
            proxy = None
        return NodeLoad(replicas, getattr(proxy, "value", proxy))


def drain(deadline_s: float, node_id: str | None = None, address: str = "auto",
          poll_s: float = 2.0) -> tuple[bool, NodeLoad, str]:
    """Drain a Ray node (default: this one) and wait for it: (drained, last load, node id)."""
    node = _RayNode(node_id, address)
    node.drain(int(deadline_s))
    drained, load = wait_drained(node.load, deadline_s, poll_s=poll_s)
    return drained, load, node.node_id


def _ray_cli() -> str:
    """The ``ray`` command of this interpreter's environment (PATH may not hold it, e.g. in a venv)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def _main(args: argparse.Namespace) -> int:
    try:
        drained, load, node_id = drain(args.deadline_s, args.node_id)
    except Exception as err:  # noqa: BLE001 - preStop must return; Kubernetes stops the pod anyway
        print(f"kvserve drain: could not drain this node: {err}", file=sys.stderr)
        return 1
    state = "drained" if drained else f"deadline passed with {load.replicas} replica(s), proxy {load.proxy}"
    print(f"kvserve drain: node {node_id[:12]} {state}")
    return 0 if drained else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kvserve drain`` to the CLI."""
    d = sub.add_parser("drain", help="drain this Ray node and wait for its replicas (pod preStop hook)")
    d.add_argument("--deadline-s", type=float, required=True,
                   help="seconds to wait at most (keep it below the pod's terminationGracePeriodSeconds)")
    d.add_argument("--node-id", help="hex id of the Ray node to drain (default: the node of this pod)")
    d.set_defaults(func=_main)
