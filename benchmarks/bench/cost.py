"""Cost per 1K tokens from a GPU-hour price: shared by ``kvserve bench`` and the simulator.

Owns ``DEFAULT_GPU_HOUR_USD`` and ``token_costs``. The price is one GPU's hour; the cost of a run
is ``gpus x duration x price``. Three figures come out, each charging the whole GPU time to one
kind of token (they do not add up; the usual way serving costs are quoted):

    cost_per_1k_input_tokens_usd    cost / input tokens x 1000
    cost_per_1k_output_tokens_usd   cost / output tokens x 1000
    cost_per_1k_tokens_usd          cost / (input + output tokens) x 1000

Default price: 5.408 USD per H200-hour, the effective accelerator rate AWS lists for p5e.48xlarge
(8 x H200, US East (Ohio), $43.26 per instance-hour) on its "Amazon EC2 Capacity Blocks for ML
Pricing" page (rates listed for late 2024). Cloud prices change; pass your own with
``--gpu-hour-usd``.
"""

from __future__ import annotations

DEFAULT_GPU_HOUR_USD = 5.408


def token_costs(*, gpus: float, duration_s: float, input_tokens: int, output_tokens: int,
                gpu_hour_usd: float = DEFAULT_GPU_HOUR_USD) -> dict:
    """Cost figures of a run that held ``gpus`` GPUs for ``duration_s`` (see module docstring)."""
    if gpu_hour_usd < 0 or gpus < 0 or duration_s < 0:
        raise ValueError("gpu_hour_usd, gpus and duration_s must be >= 0")
    cost = gpus * duration_s / 3600.0 * gpu_hour_usd

    def per_1k(tokens: int) -> float | None:
        return round(cost / tokens * 1000.0, 8) if tokens > 0 else None

    return {"gpu_hour_usd": gpu_hour_usd, "gpus": gpus, "duration_s": round(duration_s, 3),
            "cost_usd": round(cost, 6), "cost_per_1k_input_tokens_usd": per_1k(input_tokens),
            "cost_per_1k_output_tokens_usd": per_1k(output_tokens),
            "cost_per_1k_tokens_usd": per_1k(input_tokens + output_tokens)}
