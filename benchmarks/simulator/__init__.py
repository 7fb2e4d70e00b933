"""Discrete-event simulator for cluster sizes we cannot run: the production routers/ policies
against modelled vLLM replicas (prefill cost per uncached token, decode cost, LRU KV capacity).

Owns: ``workloads`` (document QA, no sharing, multi-turn chat, the Mooncake trace) and ``engine``
(the simulation). CLI: ``python -m benchmarks.simulator --help``.
"""
