"""Parameter and FLOP accounting for GLM-5, from the config alone (no model is built).

Used by `tools/model_info.py`, the trainer's throughput logging and `tools/bench.py`, so every
figure in the project comes from one formula (written out in docs/MODEL.md).
"""

from __future__ import annotations

from model.config import DEFAULT_VOCAB_DIVISIBLE_BY, GLM5Config, padded_vocab_size


def attention_params(c: GLM5Config, tp: int = 1, replicated_down_projection: bool = True,
                     with_indexer: bool = True) -> int:
    """MLA + DSA indexer of one layer, norms inside attention included, as held by one of `tp`
    tensor-parallel ranks. The up/output projections are sharded over TP; the latent norms and the
    indexer are replicated; the q/kv down projections are replicated under Transformer Engine and
    sharded by megatron's local ColumnParallelLinear (model/specs.py). `with_indexer` False: an
    IndexShare "shared" layer, which has no indexer (it reuses the preceding full layer's top-k)."""
    h, nh = c.hidden_size, c.num_attention_heads
    down = h * c.q_lora_rank + h * (c.kv_lora_rank + c.qk_rope_head_dim)
    up = c.q_lora_rank * nh * c.qk_head_dim + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim)
    o = nh * c.v_head_dim * h
    norms = c.q_lora_rank + c.kv_lora_rank
    indexer = (c.q_lora_rank * c.index_n_heads * c.index_head_dim + h * c.index_head_dim
               + 2 * c.index_head_dim + h * c.index_n_heads)
    return ((down if replicated_down_projection else down // tp) + (up + o) // tp + norms
            + (indexer if with_indexer else 0))


def indexer_layers(c: GLM5Config) -> int:
    """Decoder layers that run their own DSA indexer ("full"; every layer unless IndexShare)."""
    return sum(c.has_indexer(i) for i in range(c.num_hidden_layers))


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
    shared_attn = attention_params(c, with_indexer=False) + 2 * h
    n_full = indexer_layers(c)
    attn_all = n_full * attn + (c.num_hidden_layers - n_full) * shared_attn
    dense = mlp_params(h, c.intermediate_size)
    moe_total, moe_active = moe_params(c)
    embed = c.vocab_size * h
    n_dense, n_moe = c.first_k_dense_replace, c.num_moe_layers
    total = attn_all + n_dense * dense + n_moe * moe_total + 2 * embed + h
    active = attn_all + n_dense * dense + n_moe * moe_active + 2 * embed + h
    # MTP: enorm, hnorm, eh_proj, shared_head.norm + one MoE layer with its own indexer; shares
    # embedding and head.
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


def flops_per_token(c: GLM5Config, seq_length: int, sparse: bool = True, mtp_depths: int | None = None) -> float:
    """Model FLOPs per trained token (forward + backward = 3x forward), MTP included.

    Matmuls count 2 FLOPs per multiply-add over the active parameters that are GEMMs (the
    input embedding is a lookup); attention adds QK^T and AV over the keys each query sees
    (top-k under DSA) and, on the layers that run an indexer, its scores over all causal keys.
    `mtp_depths` (--mtp-num-layers; default one per MTP layer): each depth runs an MTP layer and the
    output head, shared or not (--mtp-use-repeated-layer); with MTP on, the main head also runs once more,
    forward only, for the draft's target p (model/modules/mtp_objective.py: acceptance log, e2e_tv).
    """
    if getattr(c, "model_type", None) == "glm5_next":  # GLM-5.3-Flash (KDA linear in the sequence; no MTP built)
        from model import accounting_flash

        return accounting_flash.flops_per_token(c, seq_length)
    p = count_parameters(c)
    depths = c.mtp_depths(mtp_depths)
    mtp_layer_active = p["params_active_with_mtp"] - p["params_active"]
    per_layer = mtp_layer_active / c.num_nextn_predict_layers if c.num_nextn_predict_layers else 0
    layers = c.num_hidden_layers + depths
    gemm_params = p["params_active"] - p["params_embedding"] + depths * per_layer
    # each MTP depth runs the output head again
    gemm_params += depths * p["params_embedding"]
    keys = mean_keys_per_query(seq_length, c.index_topk if sparse else None)
    attn = 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * keys
    indexer = 2 * c.index_n_heads * c.index_head_dim * mean_keys_per_query(seq_length, None)
    forward = 2 * gemm_params + layers * attn + (indexer_layers(c) + depths) * indexer
    target_head = 2 * p["params_embedding"] if depths else 0  # forward only, under no_grad
    return 3.0 * forward + target_head


def model_info(c: GLM5Config, seq_length: int, mtp_depths: int | None = None) -> dict:
    p = count_parameters(c)
    info = dict(p)
    info["seq_length"] = seq_length
    info["mtp_depths"] = c.mtp_depths(mtp_depths)
    info["flops_per_token"] = flops_per_token(c, seq_length, mtp_depths=mtp_depths)
    info["weights_bytes_bf16"] = 2 * p["params_total_with_mtp"]
    return info


def stage_halves(c: GLM5Config, pp: int, pp_rank: int, vpp: int | None = None,
                 layout: str | None = None) -> list[tuple[list[int], list[int]]]:
    """(GLM layers whose attention, GLM layers whose MLP or MoE) each model chunk of pipeline stage `pp_rank`
    holds: those `layout` gives it (a --pipeline-model-parallel-layout, whole GLM layers; or a
    --hybrid-layer-pattern, whose '|' may cut a GLM layer between its halves), else megatron's even split
    (chunk v of stage r holds the (v * pp + r)-th run of num_layers / (pp * vpp) layers)."""
    from model.layer_pattern import ATTENTION, pipeline_stages, segment_halves

    if layout is not None and ATTENTION in layout:
        stages = segment_halves(layout)
    else:
        whole = pipeline_stages(c.num_hidden_layers, pp, vpp, layout) or [list(range(c.num_hidden_layers))]
        stages = [(layers, layers) for layers in whole]
    return [stages[v * pp + pp_rank] for v in range(len(stages) // pp)]


def stage_layers(c: GLM5Config, pp: int, pp_rank: int, vpp: int | None = None,
                 layout: str | None = None) -> list[list[int]]:
    """The GLM layers whose attention each model chunk of stage `pp_rank` holds (stage_halves)."""
    return [attention for attention, _ in stage_halves(c, pp, pp_rank, vpp, layout)]


def local_parameters(c: GLM5Config, *, tp: int, pp: int, ep: int, etp: int, pp_rank: int, vpp: int | None = None,
                     replicated_down_projection: bool = True, layout: str | None = None,
                     make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY) -> dict:
    """Parameters one GPU holds: the layers of its pipeline stage (the embedding on the first, final
    norm, output head and MTP layer on the last), its TP shard of each, its EP share of the routed
    experts. `experts` are the routed experts (reduced over expert-DP), `dense` everything else
    (reduced over DP); `expert_bias` counts the fp32 router-bias buffers (not trained by the optimizer).
    `adam_side`: the part of `dense` that `--optimizer muon` leaves to Adam (pretrain/engine/muon.py: embeddings,
    output head, 1-D parameters, the router and the indexer's weights projection); the rest is Muon's."""
    h = c.hidden_size
    attn = attention_params(c, tp, replicated_down_projection) + 2 * h  # + input / pre-MLP norms
    shared_attn = attention_params(c, tp, replicated_down_projection, with_indexer=False) + 2 * h
    shared = mlp_params(h, c.n_shared_experts * c.moe_intermediate_size) // tp
    moe_dense = c.n_routed_experts * h + shared  # router (replicated) + shared expert
    moe_experts = c.n_routed_experts // ep * mlp_params(h, c.moe_intermediate_size) // etp
    # Adam's side under Muon: layer norms, latent norms, the indexer's key norm and weights projection, the router
    attn_adam = 2 * h + c.q_lora_rank + c.kv_lora_rank
    indexer_adam = 2 * c.index_head_dim + h * c.index_n_heads
    dense = experts = bias = adam = 0
    halves = stage_halves(c, pp, pp_rank, vpp, layout)
    for i in (i for attention, _ in halves for i in attention):  # + its input norm
        dense += (attn if c.has_indexer(i) else shared_attn) - h
        adam += attn_adam - h + (indexer_adam if c.has_indexer(i) else 0)
    for i in (i for _, mlps in halves for i in mlps):  # + its pre-MLP norm
        dense, adam = dense + h, adam + h
        if c.is_moe_layer(i):
            dense, experts, bias = dense + moe_dense, experts + moe_experts, bias + c.n_routed_experts
            adam += c.n_routed_experts * h
        else:
            dense += mlp_params(h, c.intermediate_size) // tp
    vocab = padded_vocab_size(c.vocab_size, divisible_by=make_vocab_size_divisible_by, tp=tp) * h // tp
    if pp_rank == 0:
        dense, adam = dense + vocab, adam + vocab  # input embedding
    if pp_rank == pp - 1:
        dense, adam = dense + vocab + h, adam + vocab + h  # output head, final norm
        mtp = c.num_nextn_predict_layers
        if mtp and pp > 1:
            # megatron builds the input embedding again for the MTP layer (kept in sync)
            dense, adam = dense + vocab, adam + vocab
        # enorm, hnorm, eh_proj (column-parallel), the MoE layer, its final norm
        dense += mtp * (3 * h + 2 * h * h // tp + attn + moe_dense)
        adam += mtp * (3 * h + attn_adam + indexer_adam + c.n_routed_experts * h)
        experts, bias = experts + mtp * moe_experts, bias + mtp * c.n_routed_experts
    return {"dense": dense, "experts": experts, "expert_bias": bias, "adam_side": adam,
            "layers": len({i for attention, mlps in halves for i in attention + mlps})}


# layer_activation_bytes' parts of each half of a GLM layer (two hybrid layers, model/layer_pattern.py); its
# "layer" part (a checkpoint's inputs) is split evenly between them
ATTENTION_HALF = ("input_layernorm", "attention", "core_attention")
MLP_HALF = ("pre_mlp_layernorm", "mlp", "shared_experts", "router", "experts")

# Bytes per element each RMSNorm keeps: a fused norm (Transformer Engine, torch's CUDA kernel) keeps its
# bf16 input; torch's CPU RMSNorm is composite and keeps fp32 copies of the input and the normalized
# output (tools/measure_activations.py measures it). Each also keeps a 4-byte statistic per token.
NORM_BYTES = {"fused": 2, "composite": 8}
RECOMPUTE_MODULES = ("core_attn", "mla_up_proj", "layernorm", "mlp", "moe", "shared_experts")


def layer_activation_bytes(c: GLM5Config, *, seq_length: int, micro_batch_size: int = 1, tp: int = 1,
                           etp: int = 1, cp: int = 1, moe: bool = True, recompute_granularity: str | None = None,
                           recompute_modules: list[str] | None = None, norm: str = "fused",
                           dsa_path: str = "blockwise", indexer_loss: bool = True, indexer: bool = True) -> dict:
    """Bytes one decoder layer keeps for backward per micro-batch on one GPU, by part (the parts of
    tools/measure_activations.py, which measures them; docs/MEMORY.md explains each term). bf16
    activations, sequence parallel when tp > 1, `seq_length` the tokens this CP rank holds, every
    key of the sequence gathered (seq_length x cp), routed tokens for balanced top-k routing.
    `norm`: "fused" or "composite" (NORM_BYTES); `dsa_path`: "blockwise" (torch) or "triton".
    `indexer` False: an IndexShare "shared" layer, which runs no indexer (no indexer loss) and attends
    to the top-k indices its full layer already keeps (the same tensor, counted there)."""
    if norm not in NORM_BYTES or dsa_path not in ("blockwise", "triton"):
        raise ValueError(f"norm {norm!r} / dsa_path {dsa_path!r}: choose from {sorted(NORM_BYTES)} / blockwise, triton")
    h, heads = c.hidden_size, c.num_attention_heads / tp
    ql, kl, r, dn, dv = c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim
    hi, di, k = c.index_n_heads, c.index_head_dim, min(c.index_topk, seq_length * cp)
    t = seq_length * micro_batch_size  # this rank's queries (every TP rank runs all of them, on its heads)
    keys = t * cp  # latent rows of every position, gathered
    tl = t / tp  # this rank's slice of the sequence-parallel region
    nb = NORM_BYTES[norm]
    g = recompute_granularity
    mods = set(recompute_modules or ["core_attn"]) if g == "selective" else set()
    if g == "full":  # megatron's checkpointed block keeps each layer's input; the rest is recomputed
        return {"layer": 2 * tl * h}
    out = {}
    norm_out = 2 * tl * h  # a norm's bf16 output, kept by the linear it feeds; freed under layernorm recompute
    kept_norm_out = 0 if "layernorm" in mods else norm_out
    if "layernorm" in mods:  # each norm checkpointed: its input kept, its output dropped after use
        out["layer"] = 2 * 2 * tl * h
    else:
        out["input_layernorm"] = out["pre_mlp_layernorm"] = tl * (nb * h + 4)
    # MLA outside the core attention: the q/kv down projections' input, the latent norms, the q up
    # projection's input, RoPE's cos/sin (2 of each: shared key, indexer key on local tokens; query on
    # all), the output projection's input (all tokens, this rank's heads).
    pos = seq_length  # RoPE's cos/sin are per position, shared by the micro-batch's sequences
    out["attention"] = (kept_norm_out + tl * (nb * ql + 4 + nb * kl + 4 + 2 * ql) + pos / tp * 4 * 2 * r
                        + pos * 2 * 2 * r + t * 2 * heads * dv)
    # The indexer's key norm (LayerNorm: bf16 input, mean, rstd) runs outside the core attention.
    indexer_loss = indexer_loss and indexer
    di_kept = di if indexer else 0
    core = tl * (2 * di + 8) if indexer else 0
    if "core_attn" in mods:  # the checkpoint keeps its inputs: queries, latent rows, the gathered rows
        out["attention"] += t * 2 * heads * (dn + r) + keys * (2 * (kl + r) + 2 * (kl + r + di_kept))
    else:
        idx = (8 if dsa_path == "blockwise" or indexer_loss else 0) + (4 if dsa_path == "triton" else 0)
        idx = idx if indexer else 0
        core += (pos * 2 * 2 * r * indexer  # the indexer query's RoPE cos/sin
                 + t * (2 * heads * (dn + r)  # the query, permuted into a copy for the absorption einsum
                      + 2 * heads * (kl + r)  # absorbed queries [q_nope W_uk | q_pe]
                      + idx * k + 4 * heads  # top-k indices, softmax log-sum-exp
                      + 2 * heads * kl)  # attention output in the latent (before W_uv)
                 + keys * 2 * (kl + r))  # latent rows of every key
        if indexer_loss:  # the KL loss's checkpoint keeps its inputs: indexer queries, weights, keys, positions
            core += t * (2 * hi * di + 4 * hi) + pos * 8 + keys * 2 * di
        if tp > 1 and indexer:  # under SP the indexer gathers x and the query latent, which its linears keep
            core += t * (2 * h + 2 * ql)
    out["core_attention"] = core
    if not moe:
        if "mlp" in mods:  # the checkpoint keeps its input: the pre-MLP norm's output
            out["mlp"] = kept_norm_out
        else:  # fc1's input, fc1's output (gate | up), silu(gate), the up half copied by megatron's
            # `x_linear + glu_linear_offset`, and fc2's input (the product)
            out["mlp"] = kept_norm_out + t * 10 * c.intermediate_size / tp
        return out
    if "moe" in mods:
        out["mlp"] = kept_norm_out
        return out
    e, topk, f = c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size
    fs = c.n_shared_experts * f
    if "shared_experts" in mods:
        out["mlp"] = kept_norm_out
    else:  # as the dense MLP, at the shared expert's width
        out["shared_experts"] = kept_norm_out + t * 10 * fs / tp
    # fp32 router: scores [T, E], top-k probabilities and indices, the normalization's sum
    out["router"] = tl * (4 * e + 8 * topk + 4 * topk + 4)
    out["mlp"] = out.get("mlp", 0) + tl * (8 * e + 8 * topk)  # the permutation's sorted indices
    # Each routed row (top-k per local token, gathered over expert-TP): the permuted input, then as a
    # dense MLP at f / etp, plus the probability-weighted activation and its fp32 probability.
    rows = tl * etp * topk
    out["experts"] = rows * (2 * h + 12 * f / etp + 4)
    return out


def dsa_buffer_bytes(c: GLM5Config, tokens: int, keys: int, tp: int, path: str = "blockwise") -> dict:
    """DSA's own buffers in one layer, for `tokens` queries of this rank against `keys` keys (S):
    `saved` for backward per layer and micro-batch (layer_activation_bytes counts these with the rest of
    the layer, as measured), `working` for the one layer running. `path` is
    the one model/modules/dsa.py runs: "blockwise" (torch) or "triton" keep the top-k indices
    (int64) and the softmax log-sum-exp, and a working set bounded per block of queries (torch:
    model.modules.dsa_blockwise.BLOCK_BUDGET fp32 elements for a few temporaries) or the fp32
    gradient buffers of the latent rows and the absorbed queries (Triton); "dense" keeps fp32
    softmax probabilities [heads, tokens, S] and builds scores, masks and the indexer's
    [tokens, index_heads, S] scores on top."""
    heads, k = c.num_attention_heads / tp, min(c.index_topk, keys)
    latent = c.kv_lora_rank + c.qk_rope_head_dim
    if path == "dense":
        return {"saved": 6 * heads * tokens * keys + 4 * tokens * keys,
                "working": 4 * (3 * heads + c.index_n_heads + 3) * tokens * keys}
    saved = 8 * tokens * k + 4 * tokens * heads
    if path == "triton":
        return {"saved": saved, "working": 4 * keys * latent + 4 * tokens * heads * latent}
    return {"saved": saved, "working": 4 * 4 * (1 << 24)}


def in_flight_microbatches(pp: int, pp_rank: int, vpp: int | None = None, num_microbatches: int | None = None,
                           group_size: int | None = None) -> float:
    """Micro-batches whose activations stage `pp_rank` holds at its peak, in units of the whole stage
    (all its chunks): 1F1B warms up pp - rank of them; the interleaved schedule warms up
    2 (pp - rank - 1) + (vpp - 1) group_size + 1 chunk-passes (megatron-core's count), each through
    one of the vpp chunks."""
    if vpp is None:
        n = pp - pp_rank
    else:
        n = (2 * (pp - pp_rank - 1) + (vpp - 1) * (group_size or pp) + 1) / vpp
    return min(n, num_microbatches) if num_microbatches else n


def mtp_loss_bytes(loss_type: str, depths: int, bf16: bool = True) -> float:
    """Peak bytes per token and vocabulary entry (of this TP rank's shard) the MTP loss holds, measured by
    tools/bench_mtp_objective.py (docs/MODEL.md, "GLM-5.2's MTP objective"): cross-entropy keeps each depth's
    fp32 softmax (4), e2e_tv each depth's logits (2 in bf16) and the indicator q < p (1); on top, while the
    loss runs, the acceptance's target logits, their rolled copy and the working tensors (6 and 7)."""
    if loss_type == "ce":
        return 4 * depths + 6
    if loss_type == "e2e_tv":
        return ((2 if bf16 else 4) + 1) * depths + 7
    raise ValueError(f"mtp_loss_type {loss_type!r}: choose ce or e2e_tv")


def optimizer_state_bytes(partition: float, bf16: bool = True, adam_partition: float | None = None) -> float:
    """The optimizer's state for this rank's `partition` of the parameters: fp32 main params (only for bf16
    weights: fp32 weights are their own), Adam's two fp32 moments on `adam_partition` (default: all of it),
    one fp32 momentum (Muon's) on the rest."""
    adam = partition if adam_partition is None else adam_partition
    return (4 if bf16 else 0) * partition + 8 * adam + 4 * (partition - adam)


def memory_per_gpu(c: GLM5Config, *, tp: int, pp: int, ep: int, etp: int, dp: int, seq_length: int,
                   micro_batch_size: int, distributed_optimizer: bool, full_recompute: bool = False,
                   zero_stage: int = 0, offload_optimizer: bool = False, cp: int = 1, pp_rank: int = 0,
                   vpp: int | None = None, bf16: bool = True, replicated_down_projection: bool = True,
                   num_microbatches: int | None = None, microbatch_group_size: int | None = None,
                   dsa_path: str = "triton", layout: str | None = None, mtp_depths: int | None = None,
                   recompute_granularity: str | None = None, recompute_modules: list[str] | None = None,
                   norm: str = "fused", optimizer: str = "adam", mtp_loss_type: str = "ce",
                   make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY) -> dict:
    """Estimated memory of one GPU of pipeline stage `pp_rank`, in GiB: bf16 weights (fp32 router
    bias), megatron DDP's fp32 gradient buffer, the optimizer's fp32 main params + Adam moments
    (sharded over DP by the distributed optimizer, experts over expert-DP; `optimizer` "muon": one fp32
    momentum for Muon's matrices, Adam's two moments for the rest, sharded whole parameter by whole
    parameter by megatron-core's layer-wise optimizer, about as evenly), and the activations of
    the micro-batches the pipeline keeps in flight on that stage (sequence parallel). `seq_length`
    is the sequence each CP rank holds. Activations per layer: `layer_activation_bytes` (measured by
    tools/measure_activations.py, docs/MEMORY.md) for `recompute_granularity` (or `full_recompute`)
    and `recompute_modules`; with full recompute each layer keeps its input, and the layer being
    recomputed in backward holds its whole set once. Weights, gradients and optimizer state are
    checked against what megatron-core builds by tools/simulate_layout.py.

    `zero_stage` (--dp-engine deepspeed): 1 partitions main params + moments like the distributed
    optimizer but keeps bf16 grads on the weights next to an fp32 partition; 2 keeps only the fp32
    partition of the grads (reduction buckets ignored); `offload_optimizer` moves main params and
    moments to host memory (reported as host_optimizer_gb). `mtp_depths` (--mtp-num-layers, default one per MTP
    layer): with --mtp-use-repeated-layer the one MTP layer runs at each depth, so the last stage keeps each
    depth's activations and logits (its parameters stay one layer's). `mtp_loss_type` (--mtp-loss-type): the
    bytes per token and vocabulary entry the MTP loss holds at its peak (MTP_LOSS_BYTES, measured by
    tools/bench_mtp_objective.py, docs/MODEL.md)."""
    p = local_parameters(c, tp=tp, pp=pp, ep=ep, etp=etp, pp_rank=pp_rank, vpp=vpp,
                         replicated_down_projection=replicated_down_projection, layout=layout,
                         make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    local_dense, local_experts = p["dense"], p["experts"]
    expert_dp = tp * cp * dp // (ep * etp)
    shard_dense, shard_experts = (dp * cp, expert_dp) if distributed_optimizer or zero_stage else (1, 1)
    local, partition = local_dense + local_experts, local_dense / shard_dense + local_experts / shard_experts
    grads = {0: 4 * local, 1: 2 * local + 4 * partition, 2: 4 * partition}[zero_stage]
    gib = 2**30
    if optimizer not in ("adam", "muon"):
        raise ValueError(f"optimizer {optimizer!r}: choose adam or muon")
    adam_partition = partition if optimizer == "adam" else p["adam_side"] / shard_dense
    optimizer_gb = optimizer_state_bytes(partition, bf16, adam_partition) / gib
    tokens = seq_length * micro_batch_size
    granularity = "full" if full_recompute else recompute_granularity
    in_flight = in_flight_microbatches(pp, pp_rank, vpp, num_microbatches, microbatch_group_size)
    depths = c.mtp_depths(mtp_depths)
    # ((MoE?, own indexer?), half) of each half of a GLM layer this stage runs, by GLM layer (a '|' of
    # --hybrid-layer-pattern may leave a stage one half of a layer); each MTP depth runs an MoE layer with an indexer
    halves = {}
    for v, (attention, mlps) in enumerate(stage_halves(c, pp, pp_rank, vpp, layout)):
        for i in attention:
            halves.setdefault((v, i), []).append(((c.is_moe_layer(i), c.has_indexer(i)), ATTENTION_HALF))
        for i in mlps:
            halves.setdefault((v, i), []).append(((c.is_moe_layer(i), c.has_indexer(i)), MLP_HALF))
    for depth in range(depths if pp_rank == pp - 1 else 0):
        halves[("mtp", depth)] = [((True, True), ATTENTION_HALF), ((True, True), MLP_HALF)]
    layers = [tuple(parts) for parts in halves.values()]

    def layer_bytes(parts: tuple, g: str | None) -> float:
        total = 0.0
        for (moe, indexer), half in parts:
            out = layer_activation_bytes(c, seq_length=seq_length, micro_batch_size=micro_batch_size, tp=tp,
                                         etp=etp, cp=cp, moe=moe, indexer=indexer, recompute_granularity=g,
                                         recompute_modules=recompute_modules, norm=norm, dsa_path=dsa_path)
            total += sum(v for k, v in out.items() if k in half) + out.get("layer", 0) / 2
        return total

    per_microbatch = sum(layer_bytes(parts, granularity) for parts in layers)
    activations = in_flight * per_microbatch
    if granularity == "full" and layers:  # backward recomputes one layer at a time, whole
        activations += max(layer_bytes(parts, None) for parts in set(layers))
    # the running layer's DSA working set (model/modules/dsa_blockwise.py's blocks, or Triton's buffers)
    activations += dsa_buffer_bytes(c, tokens, seq_length * cp, tp, dsa_path)["working"]
    if pp_rank == pp - 1:  # the main head's fp32 logits and the MTP loss's, one micro-batch at a time
        per_entry = 4 + (mtp_loss_bytes(mtp_loss_type, depths, bf16) if depths else 0)
        rows = padded_vocab_size(c.vocab_size, divisible_by=make_vocab_size_divisible_by, tp=tp)
        activations += per_entry * tokens * rows / tp
    return {
        "pp_stage": pp_rank,
        "params_per_gpu": local,
        "weights_gb": ((2 if bf16 else 4) * local + 4 * p["expert_bias"]) / gib,
        "grads_gb": grads / gib,
        "optimizer_gb": 0.0 if offload_optimizer else optimizer_gb,
        **({"host_optimizer_gb": optimizer_gb} if offload_optimizer else {}),
        "activations_gb_estimate": activations / gib,
        "activation_gb_per_microbatch": per_microbatch / gib,
        "in_flight_microbatches": in_flight,
    }

