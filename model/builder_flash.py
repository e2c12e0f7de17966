"""Build this rank's GLM-5.3-Flash model chunk on megatron-core's HybridModel (the layers: model/specs_flash.py;
the config and its pattern: model/mcore_config_flash.py). One chunk per rank: virtual pipeline stages are not
built for GLM-5.3-Flash yet."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.hybrid.hybrid_model import HybridModel

from model.mcore_config_flash import MTP_NOTE
from model.specs import get_backend
from model.specs_flash import flash_stack_spec


def build_flash_model(cfg, tconfig, vp_stage: int | None = None):
    """This rank's GLM-5.3-Flash HybridModel (its pipeline stage's segment of the pattern)."""
    if cfg.num_nextn_predict_layers and parallel_state.get_data_parallel_rank() == 0 \
            and parallel_state.get_pipeline_model_parallel_rank() == 0:
        print(MTP_NOTE.format(n=cfg.num_nextn_predict_layers), flush=True)

    model = HybridModel(
        config=tconfig, hybrid_stack_spec=flash_stack_spec(tconfig, get_backend(False)),
        vocab_size=tconfig.padded_vocab_size,  # model/mcore_config_flash.py: --make-vocab-size-divisible-by x TP
        max_sequence_length=cfg.max_position_embeddings, hybrid_layer_pattern=tconfig.hybrid_layer_pattern,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=False, position_embedding_type="none", vp_stage=vp_stage)
    return model.to(tconfig.params_dtype)  # our modules (KDA, mHC, the indexer) are made in fp32
