"""Build this rank's GLM-5 model chunks on megatron-core's GPTModel."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from model.config import GLM5Config
from model.mcore_config import padded_vocab_size
from model.specs import decoder_block_spec, get_backend, mtp_block_spec


def build_model_chunk(cfg: GLM5Config, tconfig, use_te: bool, vp_stage: int | None = None) -> GPTModel:
    backend = get_backend(use_te)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    offset = get_transformer_layer_offset(tconfig, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(tconfig, vp_stage=vp_stage, pp_rank=pp_rank)
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    # where --pipeline-model-parallel-layout puts the MTP layer ("m"), else on the last stage
    has_mtp = mtp_on_this_rank(tconfig.pipeline_model_parallel_layout, tconfig.mtp_num_layers,
                               ignore_virtual=False, vp_stage=vp_stage)
    return GPTModel(
        config=tconfig,
        transformer_layer_spec=decoder_block_spec(tconfig, backend, list(range(offset, offset + count))),
        vocab_size=padded_vocab_size(cfg.vocab_size, tconfig.tensor_model_parallel_size),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",  # MLA builds its own RoPE; 'rope' adds no learned table
        rotary_base=int(cfg.rope_theta),
        mtp_block_spec=mtp_block_spec(tconfig, backend) if has_mtp else None,
        vp_stage=vp_stage,
    )


def build_model(cfg: GLM5Config, tconfig, use_te: bool) -> list[GPTModel]:
    """One chunk per virtual pipeline stage (a single chunk without interleaving)."""
    vpp = tconfig.virtual_pipeline_model_parallel_size
    if vpp is None:
        return [build_model_chunk(cfg, tconfig, use_te)]
    return [build_model_chunk(cfg, tconfig, use_te, vp_stage=i) for i in range(vpp)]


def build_hybrid_chunk(cfg: GLM5Config, tconfig, use_te: bool, stages: list[list[int]] | None = None,
                       vp_stage: int | None = None):
    """This rank's chunk on megatron-core's HybridModel; `tconfig` from model/mcore_config.py
    to_hybrid_config, `stages`: the GLM layers of each pipeline segment (model/layer_pattern.py)."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from model import layer_pattern
    from model.specs import hybrid_stack_spec

    return HybridModel(
        config=tconfig,
        hybrid_stack_spec=hybrid_stack_spec(tconfig, get_backend(use_te)),
        vocab_size=padded_vocab_size(cfg.vocab_size, tconfig.tensor_model_parallel_size),
        max_sequence_length=cfg.max_position_embeddings,
        hybrid_layer_pattern=layer_pattern.derive(cfg, tconfig.mtp_num_layers or 0, stages),
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",  # MLA builds its own RoPE; HybridModel adds no table for it
        rotary_base=int(cfg.rope_theta),
        vp_stage=vp_stage,
    )
