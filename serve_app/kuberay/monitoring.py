"""Prometheus Operator PodMonitors for Ray head and worker pods, and the Grafana dashboard ConfigMap.

Owns: ``build_monitoring`` -> [PodMonitor head, PodMonitor workers, ConfigMap with the dashboard].
The head monitor scrapes ``metrics`` (Ray's metrics agent: all ray_* including ray_serve_* and the
project's own), ``as-metrics`` (autoscaler) and ``dash-metrics`` (dashboard); the worker monitor
scrapes ``metrics`` on every worker. Port names match the containers the generator writes, which the
cross-checks verify. Both add ``ray_io_cluster`` (the RayCluster behind a RayService, which changes on
upgrade) and ``rayservice`` (stable) labels, which the dashboard filters by.
"""

from __future__ import annotations

import json
from typing import Any

from serve_app.kuberay.dashboard import build_dashboard
from serve_app.kuberay.rayservice import PART_OF
from serve_app.kuberay.targets import ClusterSpec

HEAD_SCRAPE_PORTS = ("metrics", "as-metrics", "dash-metrics")
WORKER_SCRAPE_PORTS = ("metrics",)
DASHBOARD_FILE = "grafana-dashboard.json"


def _relabelings() -> list[dict[str, Any]]:
    return [
        {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "targetLabel": "ray_io_cluster"},
        {"sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"], "targetLabel": "rayservice"},
        {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_group"], "targetLabel": "ray_group"},
    ]


def _pod_monitor(cluster: ClusterSpec, node_type: str, ports: tuple[str, ...]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": f"{PART_OF}-ray-{node_type}", "namespace": cluster.namespace,
                     "labels": {"app.kubernetes.io/name": PART_OF, **cluster.monitor_labels}},
        "spec": {
            "jobLabel": "ray.io/node-type",
            "namespaceSelector": {"matchNames": [cluster.namespace]},
            "selector": {"matchLabels": {"app.kubernetes.io/name": PART_OF, "ray.io/node-type": node_type}},
            "podMetricsEndpoints": [{"port": p, "path": "/metrics", "interval": "15s",
                                     "relabelings": _relabelings()} for p in ports],
        },
    }


def dashboard_json() -> str:
    """The dashboard as the JSON text written to kuberay/grafana-dashboard.json."""
    return json.dumps(build_dashboard(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def build_monitoring(cluster: ClusterSpec) -> list[dict[str, Any]]:
    """PodMonitors and the dashboard ConfigMap (label grafana_dashboard=1 for Grafana's sidecar)."""
    return [
        _pod_monitor(cluster, "head", HEAD_SCRAPE_PORTS),
        _pod_monitor(cluster, "worker", WORKER_SCRAPE_PORTS),
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{PART_OF}-grafana-dashboard", "namespace": cluster.namespace,
                         "labels": {"app.kubernetes.io/name": PART_OF, "grafana_dashboard": "1",
                                    **cluster.monitor_labels}},
            "data": {DASHBOARD_FILE: dashboard_json()},
        },
    ]
