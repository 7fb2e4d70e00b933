"""Routing head-to-head: kvserve's routers against round-robin and Ray Serve LLM's PrefixCacheAffinityRouter.

``run`` drives the comparison (one app per system, same engines, same workloads and arrival rates);
``ray_router`` adapts Ray's router to kvserve's replica requests. See docs/routing.md.
"""
