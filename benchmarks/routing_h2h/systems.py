"""The systems of the routing head-to-head and the scales it runs at: what each system's Serve config is.

Owns ``SYSTEMS`` (system -> its ``routing`` section, optionally its ingress replica count and the workloads it runs;
``DIAGNOSTIC``: those only run when named), ``SCALES`` (per scale: engine overrides, the ``sat`` concurrency, seconds
per cell, rate fractions, client processes, workloads) and the configs derived from a base Serve config
(``serve_config``, ``system_config``, ``with_stack_sampler``, ``with_step_engine``, ``with_server_timing``) with
the ingress count they compare (``config_ingress_replicas``, ``ingress_variant``, ``default_systems``). ``run.py``
starts them and drives the cells.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.routing_h2h.summary import (
    DEFAULT_STRATEGY,
    ONE_INGRESS,
    RAY_ROUTER,
    ROUND_ROBIN,
    TWO_INGRESS,
    TWO_INGRESS_WORKLOADS,
)
from benchmarks.stack_sampler import HOOK_ENV
from serve_app.config import IngressConfig

RAY_ROUTER_CLASS = "benchmarks.routing_h2h.ray_router:RayPrefixCacheAffinity"
RAY_ROUTER_GUARD = "ray-prefix-cache-affinity-guard"

#: system -> its ``routing`` section, optionally its ingress replica count and the workloads it runs.
SYSTEMS: dict[str, dict[str, Any]] = {
    ROUND_ROBIN: {"routing": {"strategy": "round-robin"}},
    "prefix-aware": {"routing": {"strategy": "prefix-aware"}},
    "kv-aware": {"routing": {"strategy": "kv-aware"}},
    # round-robin's choices with kv-aware's KV events published, relayed and applied: what the events cost
    "round-robin+events": {"routing": {"strategy": "round-robin", "kv_events": True}},
    RAY_ROUTER: {"routing": {"request_router_class": RAY_ROUTER_CLASS}},
    # Ray's router with its load guard on (Ray 2.60 ships it off: imbalanced_threshold infinite): power of two choices
    # once Serve's queue lengths differ by more than 8, half a replica's share of the gpu scale's 64 clients
    RAY_ROUTER_GUARD: {"routing": {"request_router_class": RAY_ROUTER_CLASS,
                                   "request_router_kwargs": {"imbalanced_threshold": 8}}},
    # kv-aware with one fixed prefill speed instead of the replicas' meters (40K tokens/s: a 6K-token prompt took
    # ~170 ms on each of four engines sharing the H200): the A/B of the measured speed
    "kv-aware-fixed-speed": {"routing": {"strategy": "kv-aware", "prefill_speed": "fixed",
                                         "prefill_s_per_token": 2.5e-5}},
    # kv-aware charging 128 prefill tokens per running request instead of 16: on multiturn (fec5f7c) a replica's
    # engine TTFT p50 rose ~1.7 ms per extra running request, ~150 tokens at the ~85K tokens/s the meters read
    "kv-aware-running128": {"routing": {"strategy": "kv-aware", "running_request_tokens": 128}},
    # the default strategy at the other ingress count than the base config's: the two-ingress comparison
    TWO_INGRESS: {"routing": {"strategy": DEFAULT_STRATEGY}, "ingress_replicas": 2,
                  "workloads": list(TWO_INGRESS_WORKLOADS)},
    ONE_INGRESS: {"routing": {"strategy": DEFAULT_STRATEGY}, "ingress_replicas": 1,
                  "workloads": list(TWO_INGRESS_WORKLOADS)},
}

#: systems that explain a result rather than compete: only when named in --systems.
DIAGNOSTIC = frozenset({"round-robin+events", "kv-aware-fixed-speed", "kv-aware-running128", RAY_ROUTER_GUARD})

_DOCQA_CPU = ["--workload", "docqa", "--docs", "8", "--doc-tokens", "1024:1400", "--question-tokens", "16:32",
              "--output-len", "16"]
_DOCQA_GPU = ["--workload", "docqa", "--docs", "24", "--doc-tokens", "4096:8192", "--question-tokens", "32:64",
              "--output-len", "64"]

#: scale -> engine overrides, closed-loop concurrency of ``sat``, seconds per run, rate fractions, workloads.
SCALES: dict[str, dict[str, Any]] = {
    "cpu": {
        # 48 blocks x 128 tokens per replica: the 8 documents (~9.6K tokens) fit in two replicas, not one.
        "engine_kwargs": {"num_gpu_blocks_override": 48},
        "concurrency": 8, "duration_s": 45, "fractions": [0.7],
        "workloads": {
            "docqa": _DOCQA_CPU,
            "multiturn": ["--workload", "multiturn", "--sessions", "16", "--turns", "4", "--system-words", "300",
                          "--user-words", "20:40", "--output-len", "16"],
            "no-sharing": [*_DOCQA_CPU, "--no-sharing"],
        },
    },
    "gpu": {
        # configs/gpu-routing.yaml (4 x Llama-3.2-1B shape on one GPU): 4096 blocks x 16 tokens per replica,
        # so the 24 documents (~144K tokens) fit in the four replicas together, not in one.
        "engine_kwargs": {"num_gpu_blocks_override": 4096},
        "concurrency": 64, "duration_s": 30, "fractions": [0.25, 0.7],
        # one client process used 60-80% of a core in the saturated cells (4b72041): four keep the load generator
        # from timing itself
        "client_processes": 4,
        "workloads": {
            "docqa": _DOCQA_GPU,
            "multiturn": ["--workload", "multiturn", "--sessions", "128", "--turns", "8", "--system-words", "512",
                          "--user-words", "32:96", "--output-len", "128"],
            "no-sharing": [*_DOCQA_GPU, "--no-sharing"],
            "mooncake": ["--workload", "mooncake", "--block-tokens", "64", "--max-input-tokens", "7000",
                         "--max-output-tokens", "256"],
        },
    },
}



def serve_config(base: dict, routing: dict[str, Any], engine_kwargs: dict[str, Any],
                 ingress_replicas: int | None = None) -> dict:
    """The base Serve config with ``routing``, the scale's engine overrides and optionally ``ingress_replicas``."""
    cfg = json.loads(json.dumps(base))
    for app in cfg["applications"]:
        args = app.setdefault("args", {})
        args["routing"] = {k: v for k, v in args.get("routing", {}).items()
                           if k not in ("strategy", "request_router_class", "request_router_kwargs")} | routing
        for m in args.get("models", []):
            m["engine_kwargs"] = {**m.get("engine_kwargs", {}), **engine_kwargs}
        if ingress_replicas:
            default = IngressConfig().deployment.model_dump(mode="json", exclude_none=True)
            dep = args.setdefault("ingress", {}).setdefault("deployment", default)
            dep.pop("autoscaling_config", None)
            dep["num_replicas"] = ingress_replicas
    return cfg


def config_ingress_replicas(base: dict) -> int:
    """Ingress replicas of the base Serve config (IngressConfig's default where it names none)."""
    dep = base["applications"][0].get("args", {}).get("ingress", {}).get("deployment") or {}
    return int(dep.get("num_replicas") or IngressConfig().deployment.num_replicas or 1)


def ingress_variant(base: dict) -> str:
    """The default strategy's system at the other ingress count than the base config's."""
    return TWO_INGRESS if config_ingress_replicas(base) == 1 else ONE_INGRESS


def default_systems(base: dict) -> list[str]:
    """Every system but the diagnostic ones and the ingress variant that would repeat the base config's count."""
    other = {TWO_INGRESS, ONE_INGRESS} - {ingress_variant(base)}
    return [s for s in SYSTEMS if s not in DIAGNOSTIC and s not in other]


def system_config(base: dict, system: str, engine_kwargs: dict[str, Any]) -> dict:
    """The Serve config of one of ``SYSTEMS``."""
    spec = SYSTEMS[system]
    return serve_config(base, spec["routing"], engine_kwargs, spec.get("ingress_replicas"))


STEP_ENGINE = "benchmarks.step_engine:StepClockEngine"


def with_step_engine(base: dict, step_ms: float) -> dict:
    """``base`` with every model served by the paced fake engine (``benchmarks.step_engine``: one token per stream
    every ``step_ms``) instead of vLLM, on CPUs: the GPU's fractional GPUs dropped, a tenth of a CPU per replica and
    ingress so the GPU config's replica counts fit a small machine. Ingress, routers and client are the real ones."""
    cfg = json.loads(json.dumps(base))
    for app in cfg["applications"]:
        args = app.setdefault("args", {})
        deployments = [m.setdefault("deployment", {}) for m in args.get("models", [])]
        for m in args.get("models", []):
            m["engine_class"], m["engine_kwargs"] = STEP_ENGINE, {"step_ms": step_ms}
        for dep in [*deployments, args.setdefault("ingress", {}).setdefault("deployment", {})]:
            actor = dep.setdefault("ray_actor_options", {})
            actor.pop("num_gpus", None)
            actor["num_cpus"] = 0.1
    return cfg


def with_server_timing(cfg: dict) -> dict:
    """``cfg`` with every ingress sending its ``Server-Timing`` header (``ingress.server_timing_header``)."""
    for app in cfg["applications"]:
        app.setdefault("args", {}).setdefault("ingress", {})["server_timing_header"] = True
    return cfg


def with_stack_sampler(cfg: dict, sample_dir: Path) -> dict:
    """``cfg`` with ``benchmarks.stack_sampler`` installed in every model replica and ingress replica (idle until
    ``profile.CellProfiler`` turns it on): ``--profile``'s fallback where py-spy cannot attach."""
    env = {**HOOK_ENV, "KVSERVE_STACK_SAMPLE_DIR": str(sample_dir)}
    for app in cfg["applications"]:
        args = app.setdefault("args", {})
        for m in args.get("models", []):
            m["env"] = {**m.get("env", {}), **env}
        dep = args.setdefault("ingress", {}).setdefault("deployment", {})
        actor = dep.setdefault("ray_actor_options", {})
        runtime_env = actor.setdefault("runtime_env", {})
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    return cfg
