"""GLM-5.3-Flash's pooled-key DSA indexer (model/modules/pooled_indexer.py) selects the tokens
transformers' `Glm5NextTextIndexer` selects (complete pools only, causal by the pool's last token, the
incomplete tail always taken), its mask is transformers' and the NoPE MLA over it is
`Glm5NextTextAttention`'s."""

from __future__ import annotations

import pytest
import torch

from model.flash_hf_mapping import indexer_from_hf
from model.modules.pooled_indexer import PooledKeyIndexer, selection_mask
from tests.flash_reference import TINY, assert_fp32_close, hf_text_config, randomized

DSA_LAYER = TINY.layer_types.index("indexed_attention")


def hf_attention(cfg=TINY, implementation="eager"):
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextAttention

    hf_cfg = hf_text_config(cfg)
    hf_cfg._attn_implementation = implementation
    return randomized(Glm5NextTextAttention(hf_cfg, layer_idx=DSA_LAYER), seed=9, scale=0.5)


def inputs(s: int, seed: int = 10):
    return torch.randn(2, s, TINY.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def rows(indices: torch.Tensor) -> list[list[list[int]]]:
    """Each query's selected tokens as a sorted list (transformers orders pools by score)."""
    return [[sorted(r) for r in b] for b in indices.tolist()]


@pytest.mark.parametrize("s, tail", [(37, True), (37, False), (3, True)], ids=["tail", "no-tail", "shorter-than-a-pool"])
def test_selection_equals_transformers(s, tail):
    cfg = TINY.replace(index_kpool_always_select_tail=tail)
    attn = hf_attention(cfg)
    ours = PooledKeyIndexer(cfg).double()
    ours.load_state_dict(indexer_from_hf(attn.indexer.state_dict()))
    x = inputs(s)
    qr = attn.q_a_layernorm(attn.q_a_proj(x))
    want = attn.indexer(x, qr, attention_mask=torch.ones(2, s, dtype=torch.bool), cache=None)
    got = ours(x.transpose(0, 1), qr.transpose(0, 1))
    assert got.shape == want.shape == (2, s, cfg.index_topk + (cfg.index_kpool - 1 if tail else 0))
    assert rows(got) == rows(want)
    if s > 3 * cfg.index_kpool:  # the pools really compete: later queries leave some visible pools out
        assert (selection_mask(got, s).sum(-1)[:, -1] < s).all()


def test_mask_and_nope_attention_equal_transformers():
    attn = hf_attention(implementation="sdpa")
    ours = PooledKeyIndexer(TINY).double()
    ours.load_state_dict(indexer_from_hf(attn.indexer.state_dict()))
    s = 29
    x = inputs(s, seed=11)
    q_latent = attn.q_a_layernorm(attn.q_a_proj(x))
    indices = ours(x.transpose(0, 1), q_latent.transpose(0, 1))
    mask = selection_mask(indices, s)
    assert torch.equal(mask[:, None], attn.build_attention_mask_from_topk(indices, None, s))
    # NoPE MLA: no rotary dims, softmax scale qk_head_dim^-1/2, only the selected keys
    heads, dk = TINY.num_attention_heads, TINY.qk_head_dim
    q = attn.q_b_proj(q_latent).unflatten(-1, (heads, dk)).transpose(1, 2)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(x))).unflatten(-1, (heads, dk + TINY.v_head_dim))
    k, v = kv.transpose(1, 2).split([dk, TINY.v_head_dim], dim=-1)
    scores = (q @ k.transpose(-1, -2) * dk**-0.5).masked_fill(~mask[:, None], float("-inf"))
    out = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).flatten(-2))
    want, _, _ = attn(x, attention_mask=torch.ones(2, s, dtype=torch.bool))
    assert_fp32_close(out, want, "attention")


def test_packed_documents_are_indexed_alone():
    """Each packed document selects as it would alone (its pools from its own first token), in rows of
    the packed sequence."""
    attn = hf_attention()
    ours = PooledKeyIndexer(TINY).double()
    ours.load_state_dict(indexer_from_hf(attn.indexer.state_dict()))
    x = inputs(30, seed=14)
    qr = attn.q_a_layernorm(attn.q_a_proj(x))
    starts = torch.tensor([[0] * 11 + [11] * 19, [0] * 6 + [6] * 24])
    packed = ours(x.transpose(0, 1), qr.transpose(0, 1), doc_starts=starts)
    for row, a, e in [(0, 0, 11), (0, 11, 30), (1, 0, 6), (1, 6, 30)]:
        alone = ours(x[row:row + 1, a:e].transpose(0, 1), qr[row:row + 1, a:e].transpose(0, 1))
        assert torch.equal(packed[row:row + 1, a:e], torch.where(alone >= 0, alone + a, alone))
    assert ((packed < 0) | (packed >= starts[..., None])).all()  # nothing from an earlier document
