"""Discrete-event simulator for cluster sizes we cannot run: the production routers/ policies in
front of modelled vLLM replicas, calibrated on GPU results.

Owns: ``engine`` (the cost model of one replica), ``replica`` (per-replica cache and queues, the
shared KV tier), ``load`` and ``workloads`` (the twin of ``kvserve bench``'s load and workloads),
``sim`` (one run: its event loop), ``path`` (client, ingresses, routing, streaming back), ``scheduler``
(each replica's step loop and KV admission), ``fleet`` (replicas added, reporting, failed, scaled),
``result`` (what a run measured, cost included), ``serving_cells`` (the engine fit on a serving-overhead JSON and its
cells), ``tier_cell`` (the KV-tier cell), ``calibrate`` (the CLI, routing cells, residuals) and
``scale`` (the 8-1024 replica table). CLIs: ``python -m benchmarks.simulator``,
``python -m benchmarks.simulator.calibrate``, ``python -m benchmarks.simulator.scale``;
docs/benchmarks.md has the results; docs/calibration_history.md the routing calibration's earlier fits and trials.
"""
