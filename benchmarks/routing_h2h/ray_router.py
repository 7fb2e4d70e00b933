"""Ray Serve LLM's ``PrefixCacheAffinityRouter``, fed kvserve's replica requests.

Owns ``RayPrefixCacheAffinity``: Ray's router unchanged (its prefix tree actor, thresholds and
power-of-two fallback) except for where it reads the prompt. Ray's version reads ``prompt`` or
``messages`` text from the request; kvserve's ingress sends token ids (``GenerateRequest``), so here
each token id becomes one character (offset past the surrogate range). Two prompts then share a
character prefix exactly when they share a token prefix, which is the signal Ray's tree uses; its
character-based thresholds count tokens instead. Select it with
``routing.request_router_class: benchmarks.routing_h2h.ray_router:RayPrefixCacheAffinity``.
"""

from __future__ import annotations

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter

_OFFSET = 0x10000  # past the UTF-16 surrogates; chr() accepts ids up to 0x10FFFF - _OFFSET


def tokens_as_text(token_ids: list[int]) -> str:
    """One character per token id."""
    return "".join(chr(_OFFSET + t) for t in token_ids)


class RayPrefixCacheAffinity(PrefixCacheAffinityRouter):
    """Ray's prefix-cache affinity router over token ids."""

    def _extract_text_from_request(self, pending_request) -> str:
        gen = pending_request.args[0] if pending_request.args else None
        ids = getattr(gen, "prompt_token_ids", None)
        if ids is None:
            return super()._extract_text_from_request(pending_request)
        return tokens_as_text(ids)
