"""GLM-5's RoPE on MLA's rope dims and the DSA indexer's: interleaved pairs (0,1), (2,3), ... as HF's
`apply_rotary_pos_emb_interleave` (docs/HF_MAPPING.md, section 2).

megatron-core 0.19.2's `apply_rotary_pos_emb` de-interleaves (`cat(t[0::2], t[1::2])`) and rotates halves
only when its argument `mla_rotary_interleaved` is True; it defaults to False, so a call that does not pass
it silently rotates the wrong pairs. Every RoPE of ours goes through here (tests/model/test_rope.py
holds it to the formula).
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import apply_rotary_pos_emb


def apply_mla_rope(t: torch.Tensor, freqs: torch.Tensor, config, cp_group) -> torch.Tensor:
    """RoPE of `t` [s, b, heads, rope_dim] at `freqs` [s, 1, 1, rope_dim], interleaved pairs."""
    return apply_rotary_pos_emb(t, freqs, config=config, cp_group=cp_group, mla_rotary_interleaved=True)
