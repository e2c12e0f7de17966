"""The GLM-5 build on megatron-core's GPTModel, as this project made it before HybridModel (issue 36):
the reference tests/model/test_hybrid_model.py holds the hybrid build equal to, per weight. One process, one
stage; the same layer specs (model/specs.py layer_spec), one TransformerLayer per GLM layer."""

from __future__ import annotations

import copy

from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlockSubmodules,
    get_mtp_layer_spec_for_backend,
)
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from model import index_share
from model.specs import get_backend, layer_spec


def gpt_config(tconfig, cfg):
    """model/mcore_config.py's (hybrid) config as GPTModel's: GLM layers, the GLM IndexShare schedule."""
    g = copy.copy(tconfig)
    g.num_layers = cfg.num_hidden_layers
    g.moe_layer_freq = [int(cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers)]
    g.dsa_indexer_topk_freq, g.dsa_indexer_skip_topk_offset = (
        index_share.megatron_core_schedule(cfg.layer_indexer_types)
        if cfg.shares_top_k and tconfig.dsa_indexer_topk_freq > 1 else (1, 0))
    g.hybrid_layer_pattern = None
    return g


def build_gpt_model(cfg, tconfig, use_te: bool):
    """GPTModel on `tconfig` from gpt_config (megatron-core prints its deprecation warning)."""
    from megatron.core.models.gpt import GPTModel

    from model.modules.topk_share import IndexShareState

    backend = get_backend(use_te)
    grouped = bool(tconfig.moe_grouped_gemm)
    share = IndexShareState.for_config(tconfig)
    layers = [layer_spec(backend, tconfig, moe=cfg.is_moe_layer(i), grouped_gemm=grouped, index_share_state=share)
              for i in range(cfg.num_hidden_layers)]
    mtp = None
    if tconfig.mtp_num_layers:
        moe_layer = layer_spec(backend, tconfig, moe=True, grouped_gemm=grouped, layer_number_offset=tconfig.num_layers)
        built = 1 if tconfig.mtp_use_repeated_layer else tconfig.mtp_num_layers
        mtp = MultiTokenPredictionBlockSubmodules(
            layer_specs=[get_mtp_layer_spec_for_backend(mtp_model_layer_spec=moe_layer, backend=backend)] * built)
    return GPTModel(
        config=tconfig,
        transformer_layer_spec=TransformerBlockSubmodules(layer_specs=layers, layer_norm=backend.layer_norm(rms_norm=True)),
        vocab_size=tconfig.padded_vocab_size,
        max_sequence_length=cfg.max_position_embeddings, pre_process=True, post_process=True,
        share_embeddings_and_output_weights=False, position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta), mtp_block_spec=mtp)
