"""GLM-5.3-Flash's mHC hyper-connections (model/modules/hyper_connection.py) and clamped SwiGLU
(megatron-core's MLP and MoE layer with model/modules/clamped_swiglu.py's settings) against
transformers' modules, forward and every weight's gradient; then a whole KDA decoder layer (mHC,
norms, KDA, mHC, dense MLP) assembled from ours equals transformers' `Glm5NextTextDecoderLayer`."""

from __future__ import annotations

import pytest
import torch

from model.flash_hf_mapping import hc_from_hf
from model.modules.hyper_connection import HyperConnection, collapse_streams, expand_streams
from model.modules.kda import KimiDeltaAttention
from tests.fixtures_dist import single_process_group  # noqa: F401 (fixture)
from tests.flash_reference import (TINY, assert_fp32_close, grads, hf_text_config, layer_from_hf, mcore_mlp, mcore_moe,
                                   mlp_from_hf, moe_from_hf, randomized)

FP64 = dict(rtol=1e-10, atol=1e-12)


def streams(seed=3, s=9, b=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, TINY.hc_mult, TINY.hidden_size, generator=gen, dtype=torch.float64)


def test_hyper_connection_equals_transformers():
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextHyperConnection

    theirs = randomized(Glm5NextTextHyperConnection(hf_text_config()), seed=4)
    ours = HyperConnection.of(TINY).double()
    ours.load_state_dict(hc_from_hf(theirs.state_dict()))
    x = streams()
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    block_in, post, comb = ours(x_ours)
    t_post, t_comb, t_block_in = theirs(x_theirs)
    for got, want, name in ((block_in, t_block_in, "input"), (post, t_post, "post"), (comb, t_comb, "comb")):
        assert_fp32_close(got, want, name)  # transformers computes the maps in fp32 whatever the input
    # doubly stochastic after hc_sinkhorn_iters iterations (to the iterations' precision)
    torch.testing.assert_close(comb.sum(-2), torch.ones_like(comb.sum(-2)), rtol=0, atol=1e-5)
    # any use of all three: the merge after a block (here the block is the identity)
    HyperConnection.merge(block_in, x_ours, post, comb).square().sum().backward()
    (t_post.unsqueeze(-1) * t_block_in.unsqueeze(-2) + t_comb.transpose(-1, -2) @ x_theirs).square().sum().backward()
    assert_fp32_close(x_ours.grad, x_theirs.grad, "streams")
    theirs_g = hc_from_hf(grads(theirs))
    for name, g in grads(ours).items():
        assert_fp32_close(g, theirs_g[name], name)




def test_megatron_mlp_clamps_as_transformers(single_process_group):  # noqa: F811
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextMLP

    theirs = randomized(Glm5NextTextMLP(hf_text_config()), seed=5, scale=1.0)
    ours = mcore_mlp(TINY.intermediate_size)
    ours.load_state_dict(mlp_from_hf(theirs.state_dict()), strict=False)
    x = 3 * torch.randn(7, 2, TINY.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    gate = x @ theirs.gate_proj.weight.t()
    assert (gate > TINY.swiglu_limit).any() and (gate.abs() < TINY.swiglu_limit).any()  # the clamp matters
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ours(x_ours)[0]
    want = theirs(x_theirs)
    torch.testing.assert_close(out, want, **FP64)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, **FP64)
    theirs_g = mlp_from_hf(grads(theirs))
    for name, g in grads(ours).items():
        torch.testing.assert_close(g, theirs_g[name], **FP64, msg=name)
    # the trap mcore_settings avoids: megatron's fused swiglu drops the clamp silently
    fused = mcore_mlp(TINY.intermediate_size, fusion=True)
    fused.load_state_dict(ours.state_dict())
    assert not torch.allclose(fused(x)[0], want)




def test_megatron_moe_equals_transformers(single_process_group):  # noqa: F811
    """Sigmoid routing with the expert bias, top-k normalised and scaled by routed_scaling_factor, the shared
    expert, and the clamp inside every expert: megatron-core's MoELayer against Glm5NextTextMoE."""
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextMoE

    theirs = randomized(Glm5NextTextMoE(hf_text_config()), seed=12, scale=1.0)
    theirs.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, TINY.n_routed_experts))
    ours = mcore_moe()
    missing, _ = ours.load_state_dict(moe_from_hf(theirs.state_dict()), strict=False)
    assert not [k for k in missing if "local_tokens_per_expert" not in k]
    x = 3 * torch.randn(2, 9, TINY.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    x_ours, x_theirs = x.transpose(0, 1).contiguous().requires_grad_(), x.clone().requires_grad_()
    out = ours(x_ours)[0].transpose(0, 1)
    want = theirs(x_theirs)
    assert_fp32_close(out, want, "output")  # transformers routes in fp32
    out.square().sum().backward()
    want.square().sum().backward()
    assert_fp32_close(x_ours.grad.transpose(0, 1), x_theirs.grad, "input")
    theirs_g = moe_from_hf(grads(theirs))
    for name, g in grads(ours).items():
        assert_fp32_close(g, theirs_g[name], name)


class OurKDALayer(torch.nn.Module):
    """The decoder layer as the HybridModel spec will assemble it, in megatron's [s, b, N, h] layout."""

    def __init__(self, cfg):
        super().__init__()
        self.attn_hc, self.ffn_hc = HyperConnection.of(cfg), HyperConnection.of(cfg)
        self.input_layernorm = torch.nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attention = KimiDeltaAttention(cfg, backend="torch", chunk_size=4)
        self.pre_mlp_layernorm = torch.nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = mcore_mlp(cfg.intermediate_size)

    def forward(self, x):
        block_in, post, comb = self.attn_hc(x)
        x = HyperConnection.merge(self.self_attention(self.input_layernorm(block_in)), x, post, comb)
        block_in, post, comb = self.ffn_hc(x)
        return HyperConnection.merge(self.mlp(self.pre_mlp_layernorm(block_in))[0], x, post, comb)



def test_kda_decoder_layer_equals_transformers(single_process_group):  # noqa: F811
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextDecoderLayer

    assert TINY.layer_types[0] == "linear_attention" and TINY.mlp_layer_types[0] == "dense"
    theirs = randomized(Glm5NextTextDecoderLayer(hf_text_config(), layer_idx=0), seed=7)
    ours = OurKDALayer(TINY).double()
    ours.load_state_dict(layer_from_hf(theirs.state_dict()), strict=False)
    emb = torch.randn(2, 11, TINY.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    x_ours = expand_streams(emb, TINY.hc_mult).transpose(0, 1).clone().requires_grad_()  # [s, b, N, h]
    x_theirs = expand_streams(emb, TINY.hc_mult).requires_grad_()
    out = ours(x_ours).transpose(0, 1)
    want, _ = theirs(x_theirs, attention_mask=torch.ones(2, 11, dtype=torch.bool))
    assert_fp32_close(out, want, "streams")
    collapse_streams(out).square().sum().backward()
    want.mean(2).square().sum().backward()
    assert_fp32_close(x_ours.grad.transpose(0, 1), x_theirs.grad, "input")
    theirs_g = layer_from_hf(grads(theirs))
    for name, g in grads(ours).items():
        if name not in theirs_g:  # megatron's MLP may hold extra (unused) parameters
            continue
        assert_fp32_close(g, theirs_g[name], name)
    assert set(theirs_g) <= set(grads(ours))


@pytest.mark.parametrize("bad", [dict(hc_mult=0)])
def test_config_refuses_no_streams(bad):
    with pytest.raises(ValueError, match="hc_mult=0"):
        TINY.replace(**bad)
