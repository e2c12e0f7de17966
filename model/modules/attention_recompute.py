"""Selective recompute of the DSA core attention (`--recompute-granularity selective`, module core_attn).

megatron-core's MLA checkpoints its core attention through `Attention._checkpointed_attention_forward`,
which passes query, key, value and the mask only: DSA's core attention also needs the layer input
`x` and the normalized query latent `qr` (megatron's non-checkpointed call passes them), and ours
the per-forward inputs that CPMLASelfAttention hands it in the value's place (`LatentAttentionInputs`,
not a tensor, so the checkpoint cannot take it as an input). `GLMAttention` keeps what
its query/key/value step computed and checkpoints the core attention with all of it. A tensor of
those per-forward inputs that carries a gradient from outside (the indexer keys) becomes an input
of the checkpoint, so its gradient leaves the recomputed region; parameters (a leaf) need nothing.
The losses the core attention adds (the indexer's KL loss) are made in the recompute, where
gradients are enabled, exactly once -- as under full recompute.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import tensor_parallel

from model.modules.cp_attention import CPMLASelfAttention


def _carries_grad(t) -> bool:
    return torch.is_tensor(t) and t.requires_grad and t.grad_fn is not None


class GLMAttention(CPMLASelfAttention):
    """CPMLASelfAttention whose core attention can be recomputed selectively."""

    _x_qr = None

    def get_query_key_value_tensors(self, hidden_states, *args, **kwargs):
        out = super().get_query_key_value_tensors(hidden_states, *args, **kwargs)
        if self.checkpoint_core_attention and self.training:
            self._x_qr = (hidden_states, out[3])  # what megatron passes DSA as x and qr
        return out

    def _checkpointed_attention_forward(self, query, key, value, attention_mask, rotary_pos_emb=None,
                                        attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        (x, qr), self._x_qr = self._x_qr, None
        core = self.core_attention
        per_forward = value if dataclasses.is_dataclass(value) else None
        carried = ([f.name for f in dataclasses.fields(per_forward) if _carries_grad(getattr(per_forward, f.name))]
                   if per_forward is not None else [])
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type

        def run(query, key, value, x, qr, *carried_values):
            if per_forward is not None:  # the carried tensors as the checkpoint hands them in
                value = dataclasses.replace(per_forward, **dict(zip(carried, carried_values)))
            return core(query, key, value, attention_mask, x=x, qr=qr, attn_mask_type=mask_type,
                        attention_bias=attention_bias, packed_seq_params=packed_seq_params)

        return tensor_parallel.checkpoint(run, False, query, key, None if per_forward is not None else value, x, qr,
                                          *[getattr(per_forward, name) for name in carried])
