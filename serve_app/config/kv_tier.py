"""Configuration of the shared KV tier in Ray's object store.

Owns: ``KVTierConfig``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class KVTierConfig(BaseModel):
    """The cluster-wide prefix KV tier (a vLLM KV connector backed by Ray's object store)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Store and load prefix KV blocks through the object store.")
