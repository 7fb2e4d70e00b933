"""The one place where environment variables are read.

Every variable the project honours is declared here, with its default and meaning. Nothing else in
the code base calls ``os.environ`` for configuration (vLLM's ``envs.py`` pattern). Values are read
lazily so tests can set them with ``monkeypatch.setenv``.
"""

from __future__ import annotations

import os
from pathlib import Path

PREFIX = "KVSERVE_"
ROOT = Path(__file__).resolve().parents[1]

#: name -> (default, description). Defaults are strings, as in the environment.
VARIABLES: dict[str, tuple[str, str]] = {
    "KVSERVE_MODEL_DIR": (
        str(Path.home() / ".cache" / "kvserve" / "models"),
        "Directory where prepare-model writes models; relative model paths in configs resolve here.",
    ),
    "KVSERVE_HTTP_HOST": ("127.0.0.1", "Host the CLI's invoke/bench commands talk to."),
    "KVSERVE_HTTP_PORT": ("8000", "Port of the Serve HTTP proxy that the CLI talks to."),
    "KVSERVE_API_KEYS": (
        "", ("API keys of the ingress as `tenant:key` entries (auth.api_keys_env names this variable by default; "
        "read by deployments.auth, which keeps only their digests). Set it from a Secret, never in a config file."),
    ),
    "PYTHONHASHSEED": (
        "", "Python's own hash seed; the block-hash seed when routing.hash_seed_from_env is true (set from a Secret).",
    ),
    "KVSERVE_MOONCAKE_TRACE": (
        "../shared/traces/mooncake/conversation_trace.jsonl",
        ("Mooncake conversation trace (JSONL) that the bench, the routing head-to-head and the simulator replay by "
         "default; a relative path resolves against the repository root (on the GPU machine: the carried copy, "
         ".carry/mooncake/conversation_trace.jsonl)."),
    ),
    "KVSERVE_STACK_SAMPLE_DIR": (
        "", ("Benchmarks: where benchmarks.stack_sampler (a Ray worker setup hook) waits for its `on` file and writes "
             "the sampled stacks of its process; empty: no sampler."),
    ),
    "KVSERVE_FUZZ_REPORT": ("", "Tests: path where tests/fuzz/test_fuzz_api.py writes its case and 5xx counts."),
    "KVSERVE_REQUIRE_SCHEMAS": (
        "0", "1: tests that need the CRD schemas (kuberay/schemas, shipped) fail instead of skipping without them (CI)."
    ),
}


#: Ray Serve's own switches that the measured GPU configuration runs under (set where Ray starts: the
#: shell before `serve run`, or the pods' env on KubeRay). THROUGHPUT_OPTIMIZED runs user code and the
#: router on the replica's event loop, buffers request logs and gives each ingress replica its own HTTP
#: server; ENABLE_HA_PROXY puts HAProxy in front of those servers instead of Serve's Python proxy.
#: On the H100 this took TTFT p50 at c=1 from +7.8 ms to +3.4 ms over `vllm serve` and throughput at
#: c=64 from 0.975x to 0.998x (benchmarks/results/serving_overhead_session1.json).
SERVE_FAST_PATH_ENV: dict[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
}


#: Serve switches set on the ingress deployment alone (its ``runtime_env``), whatever the cluster's environment:
#: the replica's request handling, the FastAPI app and the handles' routing share Serve's one event loop, as
#: THROUGHPUT_OPTIMIZED has them. With the defaults each request hops from the loop that received it to a
#: user-code thread, and under a burst that thread is busy preparing the admitted requests, so the admission check
#: (``deployments.admission``) waited behind their work for its turn: here it runs in the task that received the
#: request. A value the ingress's own ``ray_actor_options.runtime_env`` sets wins.
INGRESS_LOOP_ENV: dict[str, str] = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def get(name: str) -> str:
    """Return the value of a declared variable (environment first, then its default)."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a declared setting; add it to serve_app.settings.VARIABLES")
    return os.environ.get(name, VARIABLES[name][0])


def model_dir() -> Path:
    """Directory holding prepared models."""
    return Path(get("KVSERVE_MODEL_DIR")).expanduser()


def mooncake_trace() -> Path:
    """The Mooncake trace file (``KVSERVE_MOONCAKE_TRACE``; relative to the repository root)."""
    return resolve_repo_path(get("KVSERVE_MOONCAKE_TRACE"))


def resolve_repo_path(path: str | Path) -> Path:
    """``path`` with ``~`` expanded; a relative one taken from the repository root, not the working directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (ROOT / p).resolve()


def base_url() -> str:
    """OpenAI base URL of the local service, as the CLI sees it."""
    return f"http://{get('KVSERVE_HTTP_HOST')}:{get('KVSERVE_HTTP_PORT')}/v1"
