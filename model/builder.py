"""Build this rank's GLM-5 model chunks on megatron-core's HybridModel.

The layers come from the config's hybrid layer pattern (model/layer_pattern.py, set on `tconfig` by
model/mcore_config.py): each GLM layer is a DSA attention layer and an MLP or MoE layer; the pattern's
'|' segments are the pipeline (and virtual) stages; the MTP block goes on the last stage.
"""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.hybrid.hybrid_model import HybridModel

from model.config import GLM5Config
from model.specs import get_backend, hybrid_stack_spec


def build_model_chunk(cfg: GLM5Config, tconfig, use_te: bool, vp_stage: int | None = None) -> HybridModel:
    return HybridModel(
        config=tconfig,
        hybrid_stack_spec=hybrid_stack_spec(tconfig, get_backend(use_te)),
        vocab_size=tconfig.padded_vocab_size,  # model/mcore_config.py: --make-vocab-size-divisible-by x TP
        max_sequence_length=cfg.max_position_embeddings,
        hybrid_layer_pattern=tconfig.hybrid_layer_pattern,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",  # MLA builds its own RoPE; HybridModel adds no table for it
        rotary_base=int(cfg.rope_theta),
        vp_stage=vp_stage,  # HybridModel needs it: without, every chunk would build the first segment
    )


def build_model(cfg: GLM5Config, tconfig, use_te: bool) -> list[HybridModel]:
    """One chunk per virtual pipeline stage (a single chunk without interleaving)."""
    if getattr(tconfig, "flash", None) is not None:  # GLM-5.3-Flash: model/specs_flash.py
        from model.builder_flash import build_flash_model

        return [build_flash_model(cfg, tconfig)]
    vpp = tconfig.virtual_pipeline_model_parallel_size
    if vpp is None:
        return [build_model_chunk(cfg, tconfig, use_te)]
    return [build_model_chunk(cfg, tconfig, use_te, vp_stage=i) for i in range(vpp)]
