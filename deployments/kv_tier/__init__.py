"""The shared KV tier: a vLLM KV connector that shares prefix KV blocks through Ray's object store.

Modules: ``keys`` (block keys + compatibility fingerprint, pure), ``directory`` (LRU + byte budget,
pure), ``plan`` (scheduler-side block arithmetic, pure), ``transfer`` (Ray + torch I/O),
``connector`` (the vLLM adapter) and ``engine_args`` (config -> engine kwargs). Importing the
package imports none of ray, torch or vllm.
"""

from deployments.kv_tier.engine_args import kv_tier_engine_kwargs, kv_tier_env

__all__ = ["kv_tier_engine_kwargs", "kv_tier_env"]
