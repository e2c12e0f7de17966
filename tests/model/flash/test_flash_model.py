"""The whole tiny GLM-5.3-Flash text model assembled from our pieces (KDA, mHC, pooled indexer, megatron's
MLP and MoE with the clamp; a plain NoPE MLA standing in for megatron's until the HybridModel specs)
gives transformers' `Glm5NextTextModel` hidden states and every weight's gradient: the order the layer
specs must follow (mHC around both blocks of every layer, the streams averaged before the final norm)."""

from __future__ import annotations

import torch
from torch import nn

from model.flash_hf_mapping import indexer_from_hf
from model.modules.hyper_connection import HyperConnection, collapse_streams, expand_streams
from model.modules.kda import KimiDeltaAttention
from model.modules.pooled_indexer import PooledKeyIndexer, selection_mask
from tests.fixtures_dist import single_process_group  # noqa: F401 (fixture)
from tests.flash_reference import (TINY, assert_fp32_close, grads, hf_text_config, layer_from_hf, mcore_mlp, mcore_moe,
                                   moe_from_hf, randomized)


class NoPEMLA(nn.Module):
    """MLA without rotary dims over the pooled indexer's selection, transformers' names (test stand-in)."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_a_layernorm = nn.RMSNorm(c.q_lora_rank, eps=c.rms_norm_eps)
        self.q_b_proj = nn.Linear(c.q_lora_rank, c.num_attention_heads * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(c.kv_lora_rank, eps=c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.num_attention_heads * (c.qk_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=False)
        self.indexer = PooledKeyIndexer(c)

    def forward(self, x):  # [s, b, h]
        c, x = self.c, x.transpose(0, 1)
        qr = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(qr).unflatten(-1, (c.num_attention_heads, c.qk_head_dim)).transpose(1, 2)
        kv = self.kv_b_proj(self.kv_a_layernorm(self.kv_a_proj_with_mqa(x)))
        k, v = kv.unflatten(-1, (c.num_attention_heads, -1)).transpose(1, 2).split([c.qk_head_dim, c.v_head_dim], -1)
        mask = selection_mask(self.indexer(x.transpose(0, 1), qr.transpose(0, 1)), x.shape[1])
        scores = (q @ k.transpose(-1, -2) * c.qk_head_dim**-0.5).masked_fill(~mask[:, None], float("-inf"))
        return self.o_proj((scores.softmax(-1) @ v).transpose(1, 2).flatten(-2)).transpose(0, 1)


class Layer(nn.Module):
    def __init__(self, c, i):
        super().__init__()
        self.attn_hc, self.ffn_hc = HyperConnection.of(c), HyperConnection.of(c)
        self.input_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.self_attention = KimiDeltaAttention(c, backend="torch", chunk_size=4) if c.is_linear_layer(i) else NoPEMLA(c)
        self.pre_mlp_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = mcore_moe() if c.is_moe_layer(i) else mcore_mlp(c.intermediate_size)

    def forward(self, x):  # [s, b, N, h]
        block_in, post, comb = self.attn_hc(x)
        x = HyperConnection.merge(self.self_attention(self.input_layernorm(block_in)), x, post, comb)
        block_in, post, comb = self.ffn_hc(x)
        return HyperConnection.merge(self.mlp(self.pre_mlp_layernorm(block_in))[0], x, post, comb)


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c, i) for i in range(c.num_hidden_layers))
        self.final_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, tokens):  # [b, s] -> [b, s, h]
        x = expand_streams(self.embedding(tokens.t()), self.c.hc_mult)
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(collapse_streams(x)).transpose(0, 1)


def model_from_hf(sd: dict, c) -> dict:
    ours = {"embedding.weight": sd["embed_tokens.weight"], "final_norm.weight": sd["norm.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        layer = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
        if c.is_moe_layer(i):  # layer_from_hf maps a dense MLP: the MoE's weights go by moe_from_hf
            moe = {k[4:]: v for k, v in layer.items() if k.startswith("mlp.")}
            layer = {k: v for k, v in layer.items() if not k.startswith("mlp.")}
            ours |= {f"{p}mlp.{k}": v for k, v in moe_from_hf(moe).items()}
        if not c.is_linear_layer(i):
            attn = {k[len("self_attn."):]: v for k, v in layer.items() if k.startswith("self_attn.")}
            mla = {k: v for k, v in attn.items() if not k.startswith("indexer.")}
            mla |= {f"indexer.{k}": v for k, v in indexer_from_hf(
                {k[len("indexer."):]: v for k, v in attn.items() if k.startswith("indexer.")}).items()}
            ours |= {f"{p}self_attention.{k}": v for k, v in mla.items()}
            layer = {k: v for k, v in layer.items() if not k.startswith("self_attn.")}
        ours |= {f"{p}{k}": v for k, v in layer_from_hf(layer).items()}
    return ours


def test_tiny_model_equals_transformers(single_process_group):  # noqa: F811
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextModel

    c = TINY
    assert "indexed_attention" in c.layer_types and any(map(c.is_moe_layer, range(c.num_hidden_layers)))
    theirs = randomized(Glm5NextTextModel(hf_text_config(c)), seed=15, scale=0.2)
    ours = Model(c).double()
    missing, unexpected = ours.load_state_dict(model_from_hf(theirs.state_dict(), c), strict=False)
    assert not unexpected and not [k for k in missing if "local_tokens_per_expert" not in k], missing
    tokens = torch.randint(0, c.vocab_size, (2, 19), generator=torch.Generator().manual_seed(16))
    out = ours(tokens)
    want = theirs(tokens).last_hidden_state
    assert_fp32_close(out, want, "hidden states")
    out.square().sum().backward()
    want.square().sum().backward()
    theirs_g = model_from_hf(grads(theirs), c)
    for name, g in grads(ours).items():
        if g is None and theirs_g.get(name) is None:
            continue  # the indexer: no gradient on either side (its KL loss is not here yet)
        assert_fp32_close(g, theirs_g[name], name)
