"""GLM-5.3-Flash's clamped SwiGLU: silu(min(gate, limit)) * clamp(up, -limit, limit), `swiglu_limit` 10,
in the dense MLPs, the shared expert and every routed expert (transformers' Glm5NextTextMLP/Experts).

megatron-core 0.19.2 has it: `TransformerConfig.activation_func_clamp_value` clamps exactly so in the
MLP's unfused GLU and in the experts' unfused paths (SequentialMLP, TEGroupedMLP). The traps: the fused
paths ignore the clamp without a word -- the MLP's `bias_swiglu_impl` and TEGroupedMLP's
`weighted_bias_swiglu_impl` (`bias_activation_fusion`) and TEGroupedMLP's Transformer Engine op fuser
(`use_transformer_engine_op_fuser`, its ScaledSwiGLU; megatron's support check does not look at the
clamp). `mcore_settings` turns both off with it; tests/model/flash/test_flash_modules.py holds megatron's MLP to
transformers' with these settings and shows the fused MLP path dropping the clamp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mcore_settings(swiglu_limit: float) -> dict:
    """TransformerConfig fields for the clamped SwiGLU (gated_linear_unit with silu)."""
    return dict(gated_linear_unit=True, activation_func=F.silu, activation_func_clamp_value=float(swiglu_limit),
                bias_activation_fusion=False, use_transformer_engine_op_fuser=False)


def glu_from_hf(gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """megatron's fused linear_fc1 weight [gate; up] from transformers' gate_proj and up_proj."""
    return torch.cat([gate_weight, up_weight])
