"""Parameter and FLOP accounting for GLM-5.3-Flash (model/config_flash.py), from the config alone.

Counts what transformers' `Glm5NextTextModel` builds (tests/model/flash/test_flash_accounting.py holds them equal on
the meta device) plus the untied output head. The router's expert bias is a buffer there and is not
counted; the checkpoint's MTP layer (layers.45, which transformers does not build) is left out.
FLOPs count linear attention as linear: a KDA layer's cost per token does not grow with the sequence.
"""

from __future__ import annotations

from model.accounting import mean_keys_per_query, mlp_params
from model.config_flash import GLM5FlashConfig


def kda_params(c: GLM5FlashConfig) -> int:
    h, d, heads, qkv = c.hidden_size, c.linear_head_dim, c.linear_num_heads, c.linear_qkv_dim
    in_proj = h * (3 * qkv + heads)  # q, k, v, beta
    conv = 3 * qkv * c.linear_conv_kernel_dim
    gates = 2 * (h * d + d * qkv)  # forget and output gates, low rank
    return in_proj + conv + gates + qkv + heads + d + qkv * h  # + dt_bias, A_log, out_norm, out_proj


def indexer_params(c: GLM5FlashConfig) -> int:
    d, heads, h = c.index_head_dim, c.index_n_heads, c.hidden_size
    return c.q_lora_rank * heads * d + h * d + 2 * d + h * heads + d * h + c.index_kpool * d


def mla_params(c: GLM5FlashConfig, with_indexer: bool) -> int:
    h, nh = c.hidden_size, c.num_attention_heads
    down = h * c.q_lora_rank + h * (c.kv_lora_rank + c.qk_rope_head_dim)
    up = c.q_lora_rank * nh * c.qk_head_dim + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim)
    norms = c.q_lora_rank + c.kv_lora_rank
    return down + up + norms + nh * c.v_head_dim * h + (indexer_params(c) if with_indexer else 0)


def hc_params(c: GLM5FlashConfig) -> int:
    maps = (2 + c.hc_mult) * c.hc_mult
    return maps * c.hc_mult * c.hidden_size + maps + 3


def count_parameters(c: GLM5FlashConfig) -> dict:
    h = c.hidden_size
    expert = mlp_params(h, c.moe_intermediate_size)
    total = active = 0
    for i in range(c.num_hidden_layers):
        layer = 2 * h + 2 * hc_params(c)  # two norms, two hyper-connections
        layer += kda_params(c) if c.is_linear_layer(i) else mla_params(c, c.has_indexer(i))
        if c.is_moe_layer(i):
            shared = c.n_shared_experts * expert + c.n_routed_experts * h  # + router
            total += layer + shared + c.n_routed_experts * expert
            active += layer + shared + c.num_experts_per_tok * expert
        else:
            dense = layer + mlp_params(h, c.intermediate_size)
            total, active = total + dense, active + dense
    embed = c.vocab_size * h
    return {"params_text_model": total + embed + h,  # transformers' Glm5NextTextModel
            "params_total": total + 2 * embed + h, "params_active": active + 2 * embed + h,
            "params_embedding": embed, "params_kda_layer": kda_params(c), "params_expert": expert,
            "linear_attention_layers": sum(map(c.is_linear_layer, range(c.num_hidden_layers)))}


def flops_per_token(c: GLM5FlashConfig, seq_length: int) -> float:
    """Training FLOPs per token (3x forward): 2 per multiply-add of every active GEMM weight (not the
    embedding lookup), DSA's attention over the tokens each query takes (top-k pools plus half a tail on
    average) and the indexer's scores over the pools it sees, KDA's recurrence per token (read k.S,
    rank-1 write, read q.S: 3 dk x dv multiply-adds per head, whatever the length), the short
    convolutions and the hyper-connections' mixing."""
    p = count_parameters(c)
    gemm = p["params_active"] - p["params_embedding"]
    forward = 2 * gemm
    n, h = c.hc_mult, c.hidden_size
    keys = mean_keys_per_query(seq_length, c.index_topk) + (c.index_kpool - 1) / 2
    pools = mean_keys_per_query(seq_length, None) / c.index_kpool
    for i in range(c.num_hidden_layers):
        forward += 2 * (2 * n * h + n * n * h) * 2  # collapse, expand, comb mixing; attention and MLP blocks
        if c.is_linear_layer(i):
            forward += 2 * 3 * c.linear_num_heads * c.linear_head_dim**2
            forward += 2 * 3 * c.linear_qkv_dim * c.linear_conv_kernel_dim
        else:
            forward += 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * keys
            if c.has_indexer(i):
                forward += 2 * c.index_n_heads * c.index_head_dim * pools
    return 3.0 * forward


def model_info(c: GLM5FlashConfig, seq_length: int) -> dict:
    return {**count_parameters(c), "seq_length": seq_length, "flops_per_token": flops_per_token(c, seq_length),
            "weights_bytes_bf16": 2 * count_parameters(c)["params_total"]}
