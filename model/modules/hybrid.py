"""Two slots of megatron-core 0.19.2's HybridModel that the GLM-5 spec needs to fill itself.

- `GLMHybridStack`: HybridStack builds its final norm as Transformer Engine's TENorm whatever the spec
  (hybrid_block.py); here it is the backend's norm (local on CPU, TENorm on GPU: the same module there).
- `GLMMTPLayer`: HybridModel hands the MTP block its decoder's layer specs (`hybrid_submodules`); the MTP
  layer's attention must differ from a decoder layer's -- its indexer-loss and IndexShare numbers come
  after the decoder's (megatron-core numbers the MTP inner layers 1, 2 like decoder layers 1, 2) -- so
  the MTP layer takes the specs given to it instead. Its MoE router files the aux loss at `num_layers` +
  its number (megatron-core's tracker holds num_layers + MTP depths slots): the number is the MTP layer's
  (depth 1: 1), as GPTModel's MTP layer has it, not the inner stack's 2, one past the tracker.
"""

from __future__ import annotations

from megatron.core.models.hybrid.hybrid_block import HybridStack
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer


class GLMHybridStack(HybridStack):
    def __init__(self, config, submodules, final_norm=None, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = final_norm(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)


class GLMMTPLayer(MultiTokenPredictionLayer):
    def __init__(self, *args, mtp_submodules=None, hybrid_submodules=None, **kwargs):
        super().__init__(*args, hybrid_submodules=mtp_submodules, **kwargs)
        for layer in self.mtp_model_layer.layers:
            if hasattr(layer.mlp, "set_layer_number"):  # the MoE layer
                layer.mlp.set_layer_number(self.layer_number)
