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


# --- memory per GPU -------------------------------------------------------------------------------
# The plan of docs/MEMORY.md (model/accounting.py's memory_per_gpu) for the layouts GLM-5.3-Flash trains with:
# TP 1, PP (even or given stages), EP, DP with the distributed optimizer, full recompute or none. Activations
# are counted from the code (model/modules/kda.py, kda_rule.py, pooled_indexer.py, hyper_connection.py,
# model/specs_flash.py), not yet measured. `seq_length` is the tokens of one CP rank and `cp` only scales the
# keys each query sees: CP is refused for training today (model/mcore_config_flash.py), so cp > 1 is what
# CP would need, not a layout that runs.

KDA_CHUNK = 64  # model/modules/kda.py's chunk_size (fla's chunk_kda: 64 too)
GIB = 2**30


def hybrid_stages(c: GLM5FlashConfig, pp: int, layout: str | None = None) -> list[str]:
    """Each pipeline stage's hybrid layers as pattern characters (model/mcore_config_flash.py: `G` KDA, `D` MLA +
    pooled DSA, `-` MLP, `E` MoE): `layout` a --hybrid-layer-pattern, else the layers split evenly over PP."""
    from model.mcore_config_flash import PIPE, check_flash_pattern, flash_pattern

    if layout is not None:
        check_flash_pattern(layout, c, pp)
        return layout.split(PIPE)
    n = c.num_hidden_layers
    if n % pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp}: GLM-5.3-Flash's {n} layers do not split evenly; "
                         "give the stages as --hybrid-layer-pattern")
    return flash_pattern(c, [list(range(k * (n // pp), (k + 1) * (n // pp))) for k in range(pp)]).split(PIPE)


def hybrid_layer_params(c: GLM5FlashConfig, kind: str, ep: int = 1) -> tuple[int, int, int]:
    """(dense, routed experts held at `ep`, fp32 router-bias entries) of one hybrid layer: its norm, its mHC
    maps and its block (a `D` layer with its own indexer: IndexShare is not built for Flash)."""
    h, expert = c.hidden_size, mlp_params(c.hidden_size, c.moe_intermediate_size)
    base = h + hc_params(c)
    if kind == "G":
        return base + kda_params(c), 0, 0
    if kind == "D":
        return base + mla_params(c, True), 0, 0
    if kind == "-":
        return base + mlp_params(h, c.intermediate_size), 0, 0
    return (base + c.n_shared_experts * expert + c.n_routed_experts * h,
            c.n_routed_experts // ep * expert, c.n_routed_experts)


def hc_activation_bytes(c: GLM5FlashConfig, tokens: int) -> dict:
    """What one mHC-wrapped hybrid layer keeps besides its block: its input, the N streams [s, b, N x hidden]
    in bf16 (the pre-map's weighted sum and the merge read them; full recompute keeps only these), the fp32
    copy and normalised copy the maps' matmul keeps, the block's output (post (x) output) and the fp32
    pre/post/comb maps with every Sinkhorn normalisation."""
    n, h = c.hc_mult, c.hidden_size
    return {"hc_streams": 2 * n * h * tokens,
            "hc_maps": tokens * (8 * n * h + 2 * h + 4 * n * n * (2 * c.hc_sinkhorn_iters + 2) + 4 * (2 + n) * n)}


def kda_state_bytes(c: GLM5FlashConfig, sequences: int = 1) -> int:
    """KDA's recurrent state, fp32 [heads, d_k, d_v] per sequence, whatever its length."""
    return 4 * c.linear_num_heads * c.linear_head_dim**2 * sequences


def kda_activation_bytes(c: GLM5FlashConfig, seq_length: int, micro_batch_size: int = 1) -> dict:
    """A KDA mixer's tensors kept for backward (norm and mHC apart), linear in the sequence: in_proj's output
    [q | k | v | beta] (the convolution's input), the convolution's output (SiLU's input) and q, k, v; the
    low-rank forget and output gates; what the chunked rule keeps: q, k, v, g, beta in fp32, each chunk's
    solution u, and the fp32 state [heads, d_k, d_v] at each chunk boundary; the gated output norm's input,
    gate and fp32 output and out_proj's input."""
    t, heads, d = seq_length * micro_batch_size, c.linear_num_heads, c.linear_head_dim
    qkv = c.linear_qkv_dim
    chunks = -(-seq_length // KDA_CHUNK) * micro_batch_size
    return {"kda_in_proj": t * 2 * (3 * qkv + heads),
            "kda_conv": t * 2 * 6 * qkv,
            "kda_gates": t * (2 * d + 8 * qkv + 2 * d + 2 * qkv + 4 * heads),
            "kda_rule": t * 4 * (5 * qkv + heads),
            "kda_chunk_states": chunks * kda_state_bytes(c),
            "kda_out": t * 8 * qkv}


def kda_torch_extra_bytes(c: GLM5FlashConfig, seq_length: int, micro_batch_size: int = 1) -> int:
    """What the torch reference rule (model/modules/kda_rule.py chunk_kda) keeps beyond the fused kernel's
    tensors: per chunk and head, the fp32 decay [C, C, d_k] and the two einsums' products of that shape
    (flash-linear-attention's chunk_kda never materialises them): 3 x 4 x C x heads x d_k bytes per token."""
    return 12 * KDA_CHUNK * c.linear_qkv_dim * seq_length * micro_batch_size


def selected_keys(c: GLM5FlashConfig) -> int:
    """Keys each query's sparse attention takes: index_topk tokens of the chosen pools (+ its open pool's)."""
    return c.index_topk + (c.index_kpool - 1 if c.index_kpool_always_select_tail else 0)


def dsa_activation_bytes(c: GLM5FlashConfig, seq_length: int, micro_batch_size: int = 1, cp: int = 1,
                         absorbed: bool = False) -> dict:
    """A NoPE MLA + pooled DSA mixer, as a sparse kernel over the selected keys would keep it: MLA's down
    projections' input, latent norms, up projections' inputs and the output projection's input; the per-head
    query, and key and value of every key (NoPE MLA up-projects them per head; gathered over CP); the selected
    token indices (int64) and the softmax log-sum-exp. The indexer runs under no_grad: it keeps nothing.
    `absorbed`: a kernel that keeps each key's latent row instead (W_uk, W_uv absorbed, as GLM-5's DSA path):
    64x less per key at the released sizes; model/specs_flash.py passes per-head keys and values today."""
    t, nh, keys = seq_length * micro_batch_size, c.num_attention_heads, seq_length * micro_batch_size * cp
    ql, kl = c.q_lora_rank, c.kv_lora_rank
    return {"mla": t * (2 * c.hidden_size + 2 * ql + 4 + 2 * ql + 2 * kl + 4 + 2 * kl + 2 * nh * c.v_head_dim),
            "sparse_attention": t * (2 * nh * c.qk_head_dim + 8 * selected_keys(c) + 4 * nh)
            + keys * 2 * (kl if absorbed else nh * (c.qk_head_dim + c.v_head_dim))}


def indexer_working_bytes(c: GLM5FlashConfig, seq_length: int, micro_batch_size: int = 1, cp: int = 1) -> dict:
    """The pooled indexer while its layer runs (nothing of it is kept): its fp32 queries and keys, and its scores
    [seq, seq / index_kpool] per indexer head in fp32 -- quadratic / kpool, as model/modules/pooled_indexer.py
    materialises them (`scores_whole`); a blockwise kernel (as GLM-5's, model/modules/dsa_blockwise.py) holds
    one block of query rows at a time (`scores_blockwise`: the plan's assumption)."""
    from model.modules.dsa_blockwise import BLOCK_BUDGET

    t = seq_length * micro_batch_size
    whole = 4 * c.index_n_heads * t * (seq_length * cp // c.index_kpool)
    return {"indexer_inputs": 4 * c.index_head_dim * (c.index_n_heads * t + seq_length * cp * micro_batch_size),
            "scores_whole": whole, "scores_blockwise": min(whole, 4 * BLOCK_BUDGET)}


def dense_attention_extra_bytes(c: GLM5FlashConfig, seq_length: int, micro_batch_size: int = 1,
                                cp: int = 1) -> dict:
    """What our torch path (model/specs_flash.py PooledSparseAttention: a dense masked softmax, O(s^2)) holds
    beyond the sparse kernel: `kept` per layer, the fp32 softmax and its bf16 copy per head and the bool
    selection mask; `working` while it runs, the fp32 scores and their masked copy per head."""
    area = seq_length * seq_length * cp * micro_batch_size
    return {"kept": area * (6 * c.num_attention_heads + 1), "working": area * 8 * c.num_attention_heads}


def hybrid_layer_activation_bytes(c: GLM5FlashConfig, kind: str, seq_length: int, micro_batch_size: int = 1,
                                  cp: int = 1, absorbed: bool = False) -> dict:
    """Every tensor one hybrid layer of `kind` (G, D, -, E) keeps for backward, by part (no recompute)."""
    from model.accounting import MLP_HALF, NORM_BYTES, layer_activation_bytes

    t = seq_length * micro_batch_size
    out = hc_activation_bytes(c, t)
    if kind in "GD":
        out["norm"] = t * (NORM_BYTES["fused"] * c.hidden_size + 4) + 2 * t * c.hidden_size  # + its output
        out.update(kda_activation_bytes(c, seq_length, micro_batch_size) if kind == "G"
                   else dsa_activation_bytes(c, seq_length, micro_batch_size, cp, absorbed))
    else:  # GLM-5's MLP / MoE half (the norm with it), as model/accounting.py counts it at TP 1
        mlp = layer_activation_bytes(c, seq_length=seq_length, micro_batch_size=micro_batch_size, moe=kind == "E")
        out.update({k: v for k, v in mlp.items() if k in MLP_HALF})
    return out


def local_parameters(c: GLM5FlashConfig, *, pp: int, ep: int, pp_rank: int, layout: str | None = None) -> dict:
    """Parameters one GPU of stage `pp_rank` holds at TP 1: `dense` (reduced over DP), `experts` (its EP share,
    reduced over expert-DP), `expert_bias` (fp32 router-bias buffers); the embedding on the first stage, the
    final norm and output head on the last (the vocabulary padded as megatron pads it)."""
    from model.config import DEFAULT_VOCAB_DIVISIBLE_BY, padded_vocab_size

    if c.n_routed_experts % ep:
        raise ValueError(f"--expert-model-parallel-size {ep} does not divide n_routed_experts={c.n_routed_experts}")
    kinds = hybrid_stages(c, pp, layout)[pp_rank]
    dense, experts, bias = (sum(x) for x in zip(*(hybrid_layer_params(c, k, ep) for k in kinds)))
    vocab = padded_vocab_size(c.vocab_size, divisible_by=DEFAULT_VOCAB_DIVISIBLE_BY, tp=1) * c.hidden_size
    dense += (vocab if pp_rank == 0 else 0) + (vocab + c.hidden_size if pp_rank == pp - 1 else 0)
    return {"dense": dense, "experts": experts, "expert_bias": bias, "hybrid_layers": kinds}


def memory_per_gpu(c: GLM5FlashConfig, *, pp: int, ep: int, dp: int, seq_length: int, micro_batch_size: int = 1,
                   pp_rank: int = 0, distributed_optimizer: bool = True, full_recompute: bool = False,
                   recompute_num_layers: int = 1, num_microbatches: int | None = None, layout: str | None = None,
                   tp: int = 1, cp: int = 1, absorbed_mla: bool = False) -> dict:
    """model/accounting.py's memory_per_gpu for GLM-5.3-Flash, in GiB, on one GPU of stage `pp_rank`: bf16
    weights (fp32 router bias), the fp32 gradient buffer, Adam's fp32 main params and two moments (sharded
    over DP by the distributed optimizer, experts over expert-DP = DP / EP), and the activations of the
    micro-batches in flight on the stage (`in_flight_microbatches`). Full recompute (megatron's uniform method,
    groups of `recompute_num_layers` hybrid layers): each group keeps its input, the N mHC streams, and
    backward recomputes one group whole. The fused paths are assumed (a sparse kernel over the selected keys,
    the indexer blockwise, KDA's chunked kernel); `dense_path_extra_gb` is what our torch path's dense masked
    attention and whole indexer scores add on top, `kda_torch_extra_gb` the torch reference rule's;
    `absorbed_mla` as dsa_activation_bytes' `absorbed`."""
    from model.accounting import in_flight_microbatches, optimizer_state_bytes

    if tp != 1:
        raise ValueError(f"tensor parallel {tp}: GLM-5.3-Flash trains at TP 1 (model/mcore_config_flash.py)")
    if dp % ep:
        raise ValueError(f"--expert-model-parallel-size {ep} must divide the data-parallel size {dp} (at TP 1)")
    p = local_parameters(c, pp=pp, ep=ep, pp_rank=pp_rank, layout=layout)
    local = p["dense"] + p["experts"]
    shard = (dp * cp, dp * cp // ep) if distributed_optimizer else (1, 1)
    partition = p["dense"] / shard[0] + p["experts"] / shard[1]
    kinds = p["hybrid_layers"]
    tokens = seq_length * micro_batch_size
    layers = [sum(hybrid_layer_activation_bytes(c, k, seq_length, micro_batch_size, cp, absorbed_mla).values())
              for k in kinds]
    in_flight = in_flight_microbatches(pp, pp_rank, None, num_microbatches)
    if full_recompute:
        k = recompute_num_layers
        groups = [layers[i:i + k] for i in range(0, len(layers), k)]
        per_microbatch = len(groups) * hc_activation_bytes(c, tokens)["hc_streams"]
        activations = in_flight * per_microbatch + max(map(sum, groups))
    else:
        per_microbatch = sum(layers)
        activations = in_flight * per_microbatch
    working = extra = 0
    if "G" in kinds:  # the torch reference rule's [C, C, d_k] tensors: one layer's under full recompute
        kda_extra = kda_torch_extra_bytes(c, seq_length, micro_batch_size)
        kda_extra *= 1 if full_recompute else in_flight * kinds.count("G")
    if "D" in kinds:  # the running DSA layer's indexer; the dense path's whole scores and masked softmax
        idx = indexer_working_bytes(c, seq_length, micro_batch_size, cp)
        working = idx["indexer_inputs"] + idx["scores_blockwise"]
        dense = dense_attention_extra_bytes(c, seq_length, micro_batch_size, cp)
        kept = dense["kept"] * (1 if full_recompute else in_flight * kinds.count("D"))
        extra = kept + dense["working"] + idx["scores_whole"] - idx["scores_blockwise"]
    if pp_rank == pp - 1:  # the output head's fp32 logits, one micro-batch at a time
        from model.config import DEFAULT_VOCAB_DIVISIBLE_BY, padded_vocab_size

        working += 4 * tokens * padded_vocab_size(c.vocab_size, divisible_by=DEFAULT_VOCAB_DIVISIBLE_BY, tp=1)
    out = {"pp_stage": pp_rank, "params_per_gpu": local,
           "weights_gb": (2 * local + 4 * p["expert_bias"]) / GIB, "grads_gb": 4 * local / GIB,
           "optimizer_gb": optimizer_state_bytes(partition) / GIB, "activations_gb_estimate": (activations + working) / GIB,
           "activation_gb_per_microbatch": per_microbatch / GIB, "in_flight_microbatches": in_flight,
           "kda_state_gb_per_layer": kda_state_bytes(c, micro_batch_size) / GIB,
           "dense_path_extra_gb": extra / GIB,
           **({"kda_torch_extra_gb": kda_extra / GIB} if "G" in kinds else {})}
    out["memory_gb_total_estimate"] = sum(out[k] for k in ("weights_gb", "grads_gb", "optimizer_gb",
                                                           "activations_gb_estimate"))
    return out


def memory_plan(c: GLM5FlashConfig, **layout) -> dict:
    """memory_per_gpu of every pipeline stage, and the stage that must fit (the largest total)."""
    stages = [memory_per_gpu(c, pp_rank=r, **layout) for r in range(layout["pp"])]
    return {**max(stages, key=lambda m: m["memory_gb_total_estimate"]), "stages": stages}
