"""model/modules/rope.py: MLA's RoPE rotates interleaved pairs, as transformers' GLM-5 does."""

from __future__ import annotations

import torch


def test_mla_rope_rotates_interleaved_pairs():
    """0.19's apply_rotary_pos_emb rotates halves unless `mla_rotary_interleaved=True` (0.16 took it from
    config.multi_latent_attention): ours passes it, and equals HF's interleaved RoPE."""
    from megatron.core.models.common.embeddings import apply_rotary_pos_emb

    from model.mcore_config import ModelOptions, to_transformer_config
    from model.modules.rope import apply_mla_rope
    from model.presets import get_preset
    from tests.helpers import one_rank_gloo_world

    config = to_transformer_config(get_preset("tiny"), ModelOptions())
    s, d = 6, 8
    t = torch.randn(s, 1, 2, d)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.arange(s).float()[:, None] * inv[None]  # [s, d/2]
    freqs = torch.cat([angles, angles], -1).view(s, 1, 1, d)
    x1, x2 = t[..., 0::2], t[..., 1::2]  # HF's apply_rotary_pos_emb_interleave: pairs (0,1), (2,3), ...
    cos, sin = angles.cos().view(s, 1, 1, -1), angles.sin().view(s, 1, 1, -1)
    want = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    with one_rank_gloo_world():
        group = torch.distributed.group.WORLD
        assert torch.allclose(apply_mla_rope(t, freqs, config, group), want, atol=1e-6)
        assert not torch.allclose(apply_rotary_pos_emb(t, freqs, config=config, cp_group=group), want, atol=1e-3)
