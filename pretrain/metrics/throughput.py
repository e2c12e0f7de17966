"""Throughput, one definition for every place it is logged: the `throughput/*` tags of each iteration and
--log-throughput's figure over the log interval (docs/OBSERVABILITY.md)."""

from __future__ import annotations


def tflops_per_gpu(flops_per_token: float, tokens: int, seconds: float, world_size: int) -> float:
    """Model TFLOP/s per GPU: the model FLOPs of `tokens` (model/accounting.py: forward and backward, no
    recomputation) done in `seconds` by `world_size` ranks."""
    return flops_per_token * tokens / seconds / world_size / 1e12


def step_throughput(flops_per_token: float, tokens: int, seconds: float, world_size: int) -> dict[str, float]:
    """One iteration's tokens per second (the whole world's) and model TFLOP/s per GPU."""
    return {"throughput/tokens-per-sec": tokens / seconds,
            "throughput/tflops-per-gpu": tflops_per_gpu(flops_per_token, tokens, seconds, world_size)}
