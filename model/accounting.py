"""Parameter and FLOP accounting for GLM-5, from the config alone (no model is built).

Used by `tools/model_info.py`, the trainer's throughput logging and `tools/bench.py`, so every
figure in the project comes from one formula (written out in docs/MODEL.md).
"""

from __future__ import annotations

from model.config import GLM5Config


def attention_params(c: GLM5Config) -> int:
    """MLA + DSA indexer of one layer, norms inside attention included."""
    h, nh = c.hidden_size, c.num_attention_heads
    q = h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * nh * c.qk_head_dim
    kv = (h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
          + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim))
    o = nh * c.v_head_dim * h
    indexer = (c.q_lora_rank * c.index_n_heads * c.index_head_dim + h * c.index_head_dim
               + 2 * c.index_head_dim + h * c.index_n_heads)
    return q + kv + o + indexer


def mlp_params(hidden: int, ffn: int) -> int:
    return 3 * hidden * ffn  # SwiGLU: gate, up, down


def moe_params(c: GLM5Config) -> tuple[int, int]:
    """(total, active per token) of one MoE block: experts, shared experts, router and its bias."""
    expert = mlp_params(c.hidden_size, c.moe_intermediate_size)
    router = c.n_routed_experts * c.hidden_size + c.n_routed_experts
    total = (c.n_routed_experts + c.n_shared_experts) * expert + router
    active = (c.num_experts_per_tok + c.n_shared_experts) * expert + router
    return total, active


def count_parameters(c: GLM5Config) -> dict:
    h = c.hidden_size
    attn = attention_params(c) + 2 * h  # + input_layernorm, post_attention_layernorm
    dense = mlp_params(h, c.intermediate_size)
    moe_total, moe_active = moe_params(c)
    embed = c.vocab_size * h
    n_dense, n_moe = c.first_k_dense_replace, c.num_moe_layers
    total = c.num_hidden_layers * attn + n_dense * dense + n_moe * moe_total + 2 * embed + h
    active = c.num_hidden_layers * attn + n_dense * dense + n_moe * moe_active + 2 * embed + h
    # MTP: enorm, hnorm, eh_proj, shared_head.norm + one MoE layer; shares embedding and head.
    mtp = c.num_nextn_predict_layers * (3 * h + 2 * h * h + attn + moe_total)
    mtp_active = c.num_nextn_predict_layers * (3 * h + 2 * h * h + attn + moe_active)
    return {
        "params_total": total,
        "params_total_with_mtp": total + mtp,
        "params_active": active,
        "params_active_with_mtp": active + mtp_active,
        "params_embedding": embed,
        "params_attention_per_layer": attn,
        "params_moe_layer": moe_total,
        "params_expert": mlp_params(h, c.moe_intermediate_size),
    }


def mean_keys_per_query(seq_length: int, topk: int | None) -> float:
    """Average number of keys a causal query attends to; DSA caps it at `topk`."""
    s = seq_length
    if topk is None or topk >= s:
        return (s + 1) / 2
    # positions 0..topk-1 see i+1 keys, the rest see topk
    return (topk * (topk + 1) / 2 + (s - topk) * topk) / s


def flops_per_token(c: GLM5Config, seq_length: int, sparse: bool = True) -> float:
    """Model FLOPs per trained token (forward + backward = 3x forward), MTP included.

    Matmuls count 2 FLOPs per multiply-add over the active parameters that are GEMMs (the
    input embedding is a lookup); attention adds QK^T and AV over the keys each query sees
    (top-k under DSA) and the indexer's scores over all causal keys.
    """
    p = count_parameters(c)
    layers = c.num_hidden_layers + c.num_nextn_predict_layers
    gemm_params = p["params_active_with_mtp"] - p["params_embedding"]
    # the MTP layer runs the output head a second time
    gemm_params += c.num_nextn_predict_layers * p["params_embedding"]
    keys = mean_keys_per_query(seq_length, c.index_topk if sparse else None)
    attn = 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * keys
    indexer = 2 * c.index_n_heads * c.index_head_dim * mean_keys_per_query(seq_length, None)
    forward = 2 * gemm_params + layers * (attn + indexer)
    return 3.0 * forward


def model_info(c: GLM5Config, seq_length: int) -> dict:
    p = count_parameters(c)
    info = dict(p)
    info["seq_length"] = seq_length
    info["flops_per_token"] = flops_per_token(c, seq_length)
    info["weights_bytes_bf16"] = 2 * p["params_total_with_mtp"]
    return info


def memory_per_gpu(c: GLM5Config, *, tp: int, pp: int, ep: int, etp: int, dp: int, seq_length: int,
                   micro_batch_size: int, distributed_optimizer: bool, full_recompute: bool = False,
                   zero_stage: int = 0, offload_optimizer: bool = False) -> dict:
    """Estimated peak memory of one GPU on the first pipeline stage (bf16 weights, fp32 grads,
    fp32 main params + Adam moments, 1F1B activations with sequence parallelism), in GiB.
    The activation term is an estimate: 34 bytes x hidden per token per layer (Korthikanti et al.,
    selective recompute) plus the routed experts' intermediates; it ignores DSA's score buffers.
    With full recompute only each layer's input is kept, plus one layer's working set.

    `zero_stage` (--dp-engine deepspeed): 1 partitions main params + moments like the distributed
    optimizer but keeps bf16 grads on the weights next to an fp32 partition; 2 keeps only the fp32
    partition of the grads (reduction buckets ignored); `offload_optimizer` moves main params and
    moments to host memory (reported as host_optimizer_gb)."""
    p = count_parameters(c)
    layers = c.num_hidden_layers + c.num_nextn_predict_layers
    experts = (c.num_moe_layers + c.num_nextn_predict_layers) * c.n_routed_experts * p["params_expert"]
    dense = p["params_total_with_mtp"] - experts
    local_dense, local_experts = dense / (tp * pp), experts / (ep * etp * pp)
    expert_dp = tp * dp // (ep * etp)
    shard_dense, shard_experts = (dp, expert_dp) if distributed_optimizer or zero_stage else (1, 1)
    local, partition = local_dense + local_experts, local_dense / shard_dense + local_experts / shard_experts
    grads = {0: 4 * local, 1: 2 * local + 4 * partition, 2: 4 * partition}[zero_stage]
    gib = 2**30
    tokens = seq_length * micro_batch_size
    per_layer = tokens * (34 * c.hidden_size / tp
                          + 2 * 3 * c.num_experts_per_tok * c.moe_intermediate_size / etp)
    optimizer = 12 * partition / gib
    return {
        "params_per_gpu": local,
        "weights_gb": 2 * local / gib,
        "grads_gb": grads / gib,
        "optimizer_gb": 0.0 if offload_optimizer else optimizer,
        **({"host_optimizer_gb": optimizer} if offload_optimizer else {}),
        # 1F1B keeps PP micro-batches in flight on the first stage, each through layers / PP layers
        "activations_gb_estimate": ((2 * tokens * c.hidden_size / tp * layers + per_layer) if full_recompute
                                    else per_layer * layers) / gib,
    }
