"""KubeRay deployment of kvserve: manifests generated from configs/, and their offline validation.

Owns the kuberay/ directory. ``render`` turns ``configs/eks/targets.yaml`` plus the Serve configs it
names into RayServices (serveConfigV2 = the Serve config, never hand-edited), Karpenter node pools,
PodMonitors and a Grafana dashboard; ``validate`` checks any set of manifests the way the API server,
the KubeRay operator and Ray Serve would, plus cross-checks between them. ``cli`` exposes both as
``kvserve kuberay render [--check]`` and ``kvserve kuberay validate FILE...``.

Modules: targets (input schema), rayservice, karpenter, monitoring, dashboard (builders), render
(writer and drift check), crd, rules, crosscheck, validate (validation), cli.
"""
