"""transformers' GLM-5.3-Flash submodules at the tiny preset's sizes with random weights, for the
module tests (tests/test_flash_*.py): each is compared with ours after copying the weights across
by model/flash_hf_mapping.py."""

from __future__ import annotations

import torch

from model.presets import FLASH_PRESETS

TINY = FLASH_PRESETS["glm5.3-flash-tiny"]


def hf_text_config(cfg=TINY):
    from transformers import Glm5NextTextConfig

    c = Glm5NextTextConfig(**cfg.to_hf_text_dict())
    c._attn_implementation = "eager"
    c._experts_implementation = "eager"  # the grouped-GEMM default takes no fp64
    return c


def randomized(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Every parameter drawn anew (transformers leaves some uninitialised), in fp64."""
    gen = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return module


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters()}


def assert_fp32_close(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    """Equal to what fp32 arithmetic allows, scaled to the tensor's size: transformers runs the KDA rule and
    the indexer's scores in fp32 whatever the input's dtype, and gradients sum many such terms."""
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=2e-5 * scale, msg=lambda m: f"{name}: {m}")
