"""megatron-core 0.16.1's TransformerConfig validation worked around where it refuses what we
support (listed in parallel/compat/__init__.py)."""

from __future__ import annotations

from megatron.core.transformer.transformer_config import MLATransformerConfig


def mla_config_with_dsa_cp(context_parallel_size: int = 1, **kwargs) -> MLATransformerConfig:
    """MLATransformerConfig(**kwargs) with DSA and any context-parallel degree.

    megatron-core's __post_init__ refuses DSA with context parallelism ("Currently context
    parallelism is not supported by DSAttention!"): its DSAttention has no CP. Our layer spec
    replaces it with model/modules/cp_attention.py, which has, so the config is validated with
    CP = 1 and the real degree set afterwards. Nothing else in __post_init__ depends on it here
    (its other CP checks concern cp_comm_type, unset, and gated delta net, unused); parallel/dims.py
    checks our own CP rules. Everything after construction (RoPE lengths, schedules' shapes,
    process groups) reads the real value.
    """
    config = MLATransformerConfig(**kwargs, context_parallel_size=1)
    config.context_parallel_size = context_parallel_size
    return config
