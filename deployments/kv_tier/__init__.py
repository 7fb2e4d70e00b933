"""The shared KV tier: a vLLM KV connector that shares prefix KV blocks through Ray's object store.

Modules: ``keys`` (block keys + compatibility fingerprint, pure), ``directory`` (LRU + byte budget,
pure), ``directory_actor`` (the directory as a Ray actor), ``plan`` (scheduler-side block
arithmetic, pure), the engine-side I/O ``pages`` (paged-cache byte views, staging slots,
scatter), ``host_memory`` (page-locking plasma for DMA), ``store`` (``Storer``), ``load``
(``Loader``) and ``shared`` (Ray connection, metrics, lost-object errors), ``connector`` (the vLLM
adapter) with its sides ``scheduler`` and ``worker``, ``messages`` between them and ``context``
(what both derive from the config), and ``engine_args`` (config -> engine kwargs). Importing the
package imports none of ray, torch or vllm.
"""

from deployments.kv_tier.engine_args import kv_tier_engine_kwargs, kv_tier_env

__all__ = ["kv_tier_engine_kwargs", "kv_tier_env"]
