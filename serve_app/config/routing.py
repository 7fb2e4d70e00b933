"""Routing configuration: which policy the ingress uses and its knobs.

Owns: ``RoutingConfig``. The defaults here are the single documented place for routing defaults.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Strategy = Literal["prefix-aware", "kv-aware", "round-robin", "least-loaded"]


class RoutingConfig(BaseModel):
    """How the ingress picks a replica for each request."""

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy = Field(default="prefix-aware", description="Routing policy.")
    session_header: str | None = Field(
        default=None, description="HTTP header whose value pins a session to a replica (e.g. x-session-id)."
    )
    hash_seed: str = Field(
        default="0",
        description="PYTHONHASHSEED given to every replica; vLLM derives its root block hash from it, and the "
        "router uses the same value so both compute the same block hashes.",
    )
