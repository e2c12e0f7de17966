"""Selective recompute of the DSA core attention (`--recompute-granularity selective`, module core_attn).

megatron-core 0.19.2's MLA checkpoints its core attention through `Attention._checkpointed_attention_forward`,
which hands DSA's `x` and `qr` (`core_attention_extra_kwargs`) through the checkpoint, but also puts
`value` among the checkpoint's inputs: ours is the per-forward inputs that CPMLASelfAttention hands the
core attention in the value's place (`LatentAttentionInputs`, not a tensor, which the checkpoint cannot
save). `GLMAttention` checkpoints the core attention with the tensors inside it instead. A tensor of
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

    def _checkpointed_attention_forward(self, query, key, value, attention_mask, rotary_pos_emb=None,
                                        attn_mask_type=None, attention_bias=None, packed_seq_params=None,
                                        core_attention_extra_kwargs=None):
        extra = dict(core_attention_extra_kwargs or {})  # x and qr (megatron-core 0.19.2 passes them)
        x, qr = extra.pop("x"), extra.pop("qr")
        core = self.core_attention
        per_forward = value if dataclasses.is_dataclass(value) else None
        carried = ([f.name for f in dataclasses.fields(per_forward) if _carries_grad(getattr(per_forward, f.name))]
                   if per_forward is not None else [])
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type

        def run(query, key, value, x, qr, *carried_values):
            if per_forward is not None:  # the carried tensors as the checkpoint hands them in
                value = dataclasses.replace(per_forward, **dict(zip(carried, carried_values)))
            return core(query, key, value, attention_mask, x=x, qr=qr, attn_mask_type=mask_type,
                        attention_bias=attention_bias, packed_seq_params=packed_seq_params, **extra)

        return tensor_parallel.checkpoint(run, False, query, key, None if per_forward is not None else value, x, qr,
                                          *[getattr(per_forward, name) for name in carried])
