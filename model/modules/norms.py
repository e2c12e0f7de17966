"""Norm modules for the local (torch) backend, and fixed-epsilon variants for either backend."""

from __future__ import annotations

import torch


def _mark_sequence_parallel(module: torch.nn.Module, sequence_parallel: bool) -> None:
    # Under sequence parallelism each TP rank normalizes a different slice of the sequence, so
    # these weights' grads must be all-reduced over TP: megatron's finalize_model_grads does it
    # for parameters carrying this attribute.
    for p in module.parameters():
        setattr(p, "sequence_parallel", sequence_parallel)


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron's constructor signature, usable with sequence parallelism."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)
        _mark_sequence_parallel(self, config.sequence_parallel)


def apex_rmsnorm() -> type | None:
    """Apex's fused CUDA RMSNorm with the same constructor and parameter names, when NVIDIA's apex
    is importable and a GPU is present (the local backend on a GPU without Transformer Engine)."""
    if not torch.cuda.is_available():
        return None
    try:
        from apex.normalization import FusedRMSNorm
    except ImportError:
        return None

    class ApexRMSNorm(FusedRMSNorm):
        def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
            super().__init__(hidden_size, eps=eps)
            _mark_sequence_parallel(self, config.sequence_parallel)

    return ApexRMSNorm


class LayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm (with bias) with megatron's constructor signature."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)
        _mark_sequence_parallel(self, config.sequence_parallel)


def fixed_eps_norm(norm_cls: type, eps: float) -> type:
    """A norm class that ignores the eps megatron passes (its one `layernorm_epsilon`) and uses
    `eps`. Spec `params` cannot do this: build_module would pass eps twice (docs/HF_MAPPING.md, D2)."""

    class FixedEpsNorm:
        def __new__(cls, *args, **kwargs):
            kwargs["eps"] = eps
            return norm_cls(*args, **kwargs)

    FixedEpsNorm.__name__ = f"{norm_cls.__name__}Eps{eps:g}"
    FixedEpsNorm.__qualname__ = FixedEpsNorm.__name__
    return FixedEpsNorm
