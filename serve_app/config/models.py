"""Per-model configuration: which weights, which vLLM engine arguments, which replica deployment.

Owns: ``ModelConfig``. Engine arguments are vLLM's ``AsyncEngineArgs`` fields passed through in
``engine_kwargs``; the few that the project itself derives (model path, tensor parallelism, dtype,
context length) are first-class fields and may not be repeated there. The OpenAI front end of a model
(chat template, tool-call parser, auto tool choice, reasoning parser) is configured per model as vLLM's
CLI does it (``--chat-template``, ``--tool-call-parser``, ``--enable-auto-tool-choice``,
``--reasoning-parser``); the ingress applies it (``deployments.rendering``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app import settings
from serve_app.config.deployment import DeploymentOptions

#: engine_kwargs keys that are owned by first-class fields.
_DERIVED_ENGINE_KEYS = {"model", "tokenizer", "served_model_name", "tensor_parallel_size", "dtype", "max_model_len",
                        "reasoning_parser"}


def _default_replica_options() -> DeploymentOptions:
    return DeploymentOptions(
        num_replicas=1,
        max_ongoing_requests=256,
        ray_actor_options={"num_cpus": 1},
    )


class ModelConfig(BaseModel):
    """One served model and its vLLM replica deployment."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    id: str = Field(description="Name clients pass as `model` (served model name). Must be unique.")
    path: str = Field(
        description="Model directory (config.json + weights + tokenizer). Relative paths resolve under "
        "KVSERVE_MODEL_DIR, where `kvserve prepare-model` writes."
    )
    tokenizer: str | None = Field(default=None, description="Tokenizer directory; defaults to `path`.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per replica (one placement bundle each).")
    dtype: str = Field(default="auto", description="vLLM dtype: auto, float32, float16, bfloat16.")
    max_model_len: int | None = Field(default=None, ge=16, description="Context length; default from the model.")
    accelerator_type: str | None = Field(
        default=None, description="Ray accelerator type (e.g. H100) requested by every GPU bundle."
    )
    placement_group_strategy: str = Field(
        default="STRICT_PACK", description="Placement strategy of the replica's bundles (PACK, STRICT_PACK, ...)."
    )
    engine_start_timeout_s: float = Field(
        default=1200.0, gt=0,
        description="A replica whose vLLM engine is not up after this many seconds kills the engine's "
        "processes and exits, so Serve reports a failed replica instead of waiting on a hung start "
        "(seen with tensor-parallel warm-up crashes).",
    )
    engine_stall_timeout_s: float = Field(
        default=60.0, gt=0,
        description="The replica's health check fails when requests are running and the engine has completed no "
        "step for this many seconds (a hung or stopped engine), so Serve replaces the replica. Longer than the "
        "slowest single step (a full-length prefill).",
    )
    engine_class: str | None = Field(
        default=None, pattern=r"^[\w.]+:\w+$",
        description="'module:Class' of an engine implementing deployments.engine.Engine to use instead of vLLM "
        "(its async classmethod create(model, app) builds it). For tests and overhead measurements of the "
        "serving path; unset in production.")
    stream_merge_lag_ms: float = Field(
        default=5.0, ge=0,
        description="Each engine step of a stream goes out as its own chunk while the replica's event loop runs "
        "its timers less than this late (smoothed); above it, streams merge consecutive steps into one chunk per "
        "stream_merge_interval_ms (fewer messages through Ray, unchanged tokens/s) until the lag falls below half "
        "of it. 0 never merges.",
    )
    stream_merge_interval_ms: float = Field(
        default=20.0, gt=0,
        description="While the replica lags (stream_merge_lag_ms), the shortest time between two chunks of a stream.",
    )
    detokenizer_prime_tokens: int | None = Field(
        default=128, ge=1,
        description="vLLM's incremental detokenizer is primed with the last this many prompt tokens instead of "
        "the whole prompt, which it decodes on the request's first output token and on every output token that "
        "leaves a character incomplete, on the replica's event loop (deployments.detokenizer_priming). The "
        "streamed text is the same. null: the whole prompt (vLLM's own behaviour).")
    chat_template: str | None = Field(
        default=None,
        description="Chat template used instead of the tokenizer's (vLLM's --chat-template): a file path, or the "
        "Jinja template itself.")
    tool_call_parser: str | None = Field(
        default=None,
        description="vLLM tool-call parser name (vLLM's --tool-call-parser, e.g. hermes, llama3_json, pythonic): "
        "turns the model's tool-call text into OpenAI tool_calls. tool_choice required/named work without one "
        "(the output is constrained to the tools' JSON schema).")
    enable_auto_tool_choice: bool = Field(
        default=False,
        description="Let the model decide when to call tools (tool_choice auto; vLLM's --enable-auto-tool-choice). "
        "Needs tool_call_parser.")
    reasoning_parser: str | None = Field(
        default=None,
        description="vLLM reasoning parser name (vLLM's --reasoning-parser, e.g. deepseek_r1, qwen3): the reasoning "
        "goes to message.reasoning instead of the content; also given to the engine so that structured outputs "
        "start after the reasoning.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra vLLM AsyncEngineArgs, passed through unchanged."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables set in the replica's runtime_env."
    )
    deployment: DeploymentOptions = Field(
        default_factory=_default_replica_options, description="Ray Serve options of the replica deployment."
    )

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]*", value):
            raise ValueError(f"model id {value!r} may contain only letters, digits and . _ : / -")
        return value

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        allowed = {"auto", "float32", "float16", "bfloat16", "half", "float"}
        if value not in allowed:
            raise ValueError(f"dtype must be one of {sorted(allowed)}, got {value!r}")
        return value

    @field_validator("engine_kwargs")
    @classmethod
    def _check_engine_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(_DERIVED_ENGINE_KEYS & value.keys())
        if clash:
            raise ValueError(f"{clash} are first-class model fields; set them there, not in engine_kwargs")
        return value

    @model_validator(mode="after")
    def _check_tools(self) -> ModelConfig:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError(f"model {self.id}: enable_auto_tool_choice needs tool_call_parser")
        return self

    def resolved_path(self) -> Path:
        """Absolute model directory."""
        p = Path(self.path).expanduser()
        return p if p.is_absolute() else settings.model_dir() / p

    def resolved_tokenizer(self) -> Path:
        """Absolute tokenizer directory."""
        if self.tokenizer is None:
            return self.resolved_path()
        p = Path(self.tokenizer).expanduser()
        return p if p.is_absolute() else settings.model_dir() / p
