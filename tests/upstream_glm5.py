"""megatron-core 0.19.2's own GLM-5, configured as Megatron-Bridge 0.6.2's GLM5Bridge configures it, on CPU.

The other side of the checkpoint exchange (tests/parallel/test_mcore_exchange.py). Built from megatron-core's
stock pieces only: `get_transformer_layer_with_experimental_attention_variant_spec` (its decoder-block
wrapper asserts Transformer Engine, so the layer list is taken directly, as that wrapper does) with
megatron-core's local provider, and `get_gpt_mtp_block_spec`. Two slots need a class the local
provider cannot name: the stock spec asks the backend for `linear()`, which only TE's provider has
(a replicated linear, `parallel_mode="duplicated"`), and `AbsorbedMLASelfAttention` accepts only TE's
linear or `ColumnParallelLinear` for its down projections, which the stock spec fills with that same
`linear()`. So `linear()` is a plain replicated linear here and the two down projections are
`ColumnParallelLinear`, what AbsorbedMLA itself gathers and re-splits (its docstring). Nothing of this
project's model/ is used, so the tests compare two independent builds.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.tensor_parallel.layers import ColumnParallelLinear


class ReplicatedLinear(torch.nn.Module):
    """y = x W^T, the same on every TP rank (TE's `TELinear(parallel_mode="duplicated")` on CPU)."""

    def __init__(self, input_size, output_size, *, config, init_method, bias=False, **_unused):
        super().__init__()
        assert not bias
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        init_method(self.weight)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight), None


class LocalProviderWithLinear(LocalSpecProvider):
    def linear(self):
        return ReplicatedLinear


def bridge_config(tconfig):
    """Our TransformerConfig with the DSA fields GLM5Bridge.provider_bridge sets (the rest of its
    settings -- sigmoid routing with the expert bias, RMSNorm, SwiGLU, untied head -- are ours too)."""
    return dataclasses.replace(
        tconfig, dsa_indexer_rope_interleaved=True, dsa_indexer_topk_freq=1, dsa_indexer_skip_topk_offset=0,
        dsa_indexer_rotate_activation=False, dsa_indexer_k_norm_epsilon=1e-6, dsa_kernel_backend="none",
        mscale_all_dim=1.0, rotary_scaling_factor=1.0, mscale=1.0, qk_layernorm=True,
        cp_comm_type="allgather", transformer_impl="local")


def upstream_layer_specs(tconfig):
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
        get_transformer_layer_with_experimental_attention_variant_spec,
    )

    specs = get_transformer_layer_with_experimental_attention_variant_spec(tconfig, LocalProviderWithLinear())
    for spec in specs:
        sub = spec.submodules.self_attention.submodules
        sub.linear_q_down_proj = ColumnParallelLinear
        sub.linear_kv_down_proj = ColumnParallelLinear
    return specs


def build_upstream_model(cfg, tconfig):
    """megatron-core's GLM-5 GPTModel (one process, TP=1) for our GLM5Config `cfg`."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from model.config import DEFAULT_VOCAB_DIVISIBLE_BY, padded_vocab_size

    specs = upstream_layer_specs(tconfig)
    block = TransformerBlockSubmodules(layer_specs=specs, layer_norm=LocalProviderWithLinear().layer_norm(True))
    mtp = get_gpt_mtp_block_spec(tconfig, specs[-1], use_transformer_engine=False) if tconfig.mtp_num_layers else None
    return GPTModel(config=tconfig, transformer_layer_spec=block,
                    vocab_size=padded_vocab_size(cfg.vocab_size, divisible_by=DEFAULT_VOCAB_DIVISIBLE_BY,
                                                 tp=tconfig.tensor_model_parallel_size),
                    max_sequence_length=cfg.max_position_embeddings, pre_process=True, post_process=True,
                    share_embeddings_and_output_weights=False, position_embedding_type="rope",
                    rotary_base=int(cfg.rope_theta), mtp_block_spec=mtp)
