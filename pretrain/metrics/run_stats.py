"""Per-step statistics: memory (this rank's peak, always; every rank's with --log-memory-to-tensorboard)
and the weights' norm (--log-params-norm). The ones over all ranks are collectives, on the runtime's
device (NCCL takes no host tensor)."""

from __future__ import annotations

import math
import resource

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared


def peak_bytes() -> float:
    """This rank's peak memory: CUDA's peak of allocated bytes, or on CPU the kernel's high-water mark of
    the resident set (getrusage: KiB on Linux)."""
    if torch.cuda.is_available():
        return float(torch.cuda.max_memory_allocated())
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def memory_gb() -> dict[str, float]:
    """This rank's peak in GiB, read without synchronising (logged every iteration)."""
    tag = "memory/max-allocated-gb" if torch.cuda.is_available() else "memory/max-rss-gb"
    return {tag: peak_bytes() / 2**30}


def _own_memory() -> tuple[dict[str, float], float]:
    """(this rank's memory tags, its peak in bytes)."""
    if torch.cuda.is_available():
        s = torch.cuda.memory_stats()
        own = {"mem-allocated-bytes": s["allocated_bytes.all.current"],
               "mem-reserved-bytes": s["reserved_bytes.all.current"],
               "mem-max-allocated-bytes": s["allocated_bytes.all.peak"],
               "mem-allocated-count": s["allocation.all.current"]}
        return {k: float(v) for k, v in own.items()}, float(s["allocated_bytes.all.peak"])
    import psutil

    rss = float(psutil.Process().memory_info().rss)
    # the kernel's high-water mark lags the current resident set: the peak is at least it
    max_rss = max(peak_bytes(), rss)
    return {"mem-cpu-rss-bytes": rss, "mem-cpu-max-rss-bytes": max_rss}, max_rss


def memory_scalars(device: torch.device) -> dict[str, float]:
    """This rank's memory (Megatron-LM's mem-* tags on CUDA; the resident set on CPU) and the peak
    over all ranks: its highest and lowest value, and the rank at the highest. Every rank calls it."""
    own, peak = _own_memory()
    peaks = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, torch.tensor([peak], dtype=torch.float64, device=device))
    values = [float(p) for p in peaks]
    top = max(range(len(values)), key=values.__getitem__)
    return {**own, "mem-peak-max-over-ranks-bytes": values[top], "mem-peak-min-over-ranks-bytes": min(values),
            "mem-peak-argmax-rank": float(top)}


def params_norm(model: list, device: torch.device) -> float:
    """The L2 norm of all the model's weights, each counted once: tensor-parallel replicas (of the
    dense layers over TP, of the experts over expert-TP) and pipeline-shared copies skipped, dense
    weights summed over TP x PP, experts over expert-TP x EP x PP (Megatron-LM's calc_params_l2_norm).
    Every rank calls it."""
    tp, etp = ps.get_tensor_model_parallel_group(), ps.get_expert_tensor_parallel_group()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # dense, experts
    for chunk in model:
        for p in chunk.parameters():
            if not param_is_not_shared(p) or not param_is_not_tensor_parallel_duplicate(p, tp, etp):
                continue
            expert = getattr(p, "allreduce", True) is False
            sums[int(expert)] += torch.linalg.vector_norm(p.detach(), dtype=torch.float32).double() ** 2
    dense, experts = sums[0:1].clone(), sums[1:2].clone()
    dist.all_reduce(dense, group=ps.get_model_parallel_group())
    dist.all_reduce(experts, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    return math.sqrt(float(dense) + float(experts))
