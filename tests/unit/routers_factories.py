"""Factories shared by the routing unit tests (plain helpers, not fixtures)."""

from __future__ import annotations

import dataclasses
import random

from routers.hashing import block_hashes
from routers.policy import Knobs, make_policy
from routers.types import ReplicaSnapshot, RoutingRequest
from serve_app.config.routing import RoutingConfig


def knobs(**overrides) -> Knobs:
    """Default knobs (from RoutingConfig, the one place for defaults) with overrides."""
    return dataclasses.replace(RoutingConfig().knobs(), **overrides)


def policy(strategy: str = "prefix-aware", **overrides):
    return make_policy(knobs(strategy=strategy, **overrides))


def snaps(n: int, **fields) -> list[ReplicaSnapshot]:
    return [ReplicaSnapshot(replica_id=f"r{i}", kv_capacity_blocks=1000, **fields) for i in range(n)]


def request(tokens: list[int], block_size: int = 16, session: str | None = None, salt: str | None = None):
    return RoutingRequest(
        model_id="m",
        num_prompt_tokens=len(tokens),
        block_hashes=tuple(block_hashes(tokens, block_size, salt=salt)),
        session_key=session,
    )


def doc(seed: int, n: int = 256) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50_000) for _ in range(n)]
