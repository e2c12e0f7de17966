"""GLM5Config + run options -> megatron-core's MLATransformerConfig.

Every GLM-5 trap of docs/HF_MAPPING.md D5 is set here explicitly: plain RoPE (not yarn) with theta 1e6,
mscale_all_dim 0, the nope/rope/v head dims, no linear biases, sigmoid routing in fp32 with the
expert bias and the 2.5 scaling factor, no capacity factor, the dense-then-MoE layer pattern,
SwiGLU, untied head, and the MTP layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import MLATransformerConfig

from model import index_share, layer_pattern
from model.config import DEFAULT_VOCAB_DIVISIBLE_BY, GLM5Config, padded_vocab_size
from parallel.dims import ParallelDims

SINGLE_PROCESS = ParallelDims(world_size=1)


@dataclass
class ModelOptions:
    """Run-time choices that are not part of the architecture (Megatron-LM flag names). The parallel
    layout is not among them: it is the run's ParallelDims (parallel/dims.py), passed beside these."""

    params_dtype: torch.dtype = torch.float32
    bf16: bool = False
    fp8_recipe: str | None = None  # delayed | tensorwise | blockwise | mxfp8 (TE only)
    use_te: bool = False
    dsa_indexer_topk: int | None = None  # overrides the config's index_topk
    dsa_indexer_loss_coeff: float = 0.0
    dsa_indexer_use_sparse_loss: bool = False
    # --dsa-kernel-backend (DSA_KERNEL_BACKENDS); None: this device's default (default_dsa_kernel_backend)
    dsa_kernel_backend: str | None = None
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY  # rows padded to a multiple of this x TP
    mtp_loss_scaling_factor: float = 0.3
    # MTP depths (Megatron-LM's --mtp-num-layers; default: the config's num_nextn_predict_layers) and
    # --mtp-use-repeated-layer: one set of MTP parameters applied at every depth (GLM-5: 3 depths, shared)
    mtp_num_layers: int | None = None
    mtp_use_repeated_layer: bool = False
    mtp_loss_type: str = "ce"  # --mtp-loss-type: ce | e2e_tv (model/modules/mtp_objective.py)
    mtp_detach_heads: bool = False  # megatron-core's: MTP gradients stop at the MTP layer
    moe_router_bias_update_rate: float = 1e-3
    moe_aux_loss_coeff: float = 0.0  # sequence-wise auxiliary loss (DeepSeek-V3: 1e-4)
    moe_expert_capacity_factor: float | None = None  # None: dropless (GLM-5, DeepSeek-V3)
    moe_grouped_gemm: bool = False
    moe_token_dispatcher_type: str = "alltoall"  # alltoall | allgather | flex
    moe_flex_dispatcher_backend: str | None = None  # deepep | hybridep, with flex
    moe_router_dtype: str = "fp32"  # fp32 | fp64
    moe_permute_fusion: bool = False  # TE's fused permutation
    moe_shared_expert_overlap: bool = False
    recompute_granularity: str | None = None  # full | selective
    recompute_method: str | None = None  # with full: uniform (default) | block
    recompute_num_layers: int | None = None  # with full: default 1
    recompute_modules: list[str] | None = None  # with selective: default ["core_attn"]
    overlap_p2p_comm: bool = False
    # gloo matches a batch of isend/irecv between the same two ranks in issue order, unlike NCCL's
    # grouped calls: interleaved PP=2 then swaps activations and gradients. Unbatched on CPU.
    batch_p2p_comm: bool = True


# megatron-core 0.19.2's `dsa_kernel_backend` values build its own attention modules
# (AbsorbedMLASelfAttention, DSAttention, DSAIndexer); ours build model/modules/ (docs/MODEL.md).
UPSTREAM_DSA_BACKENDS = ("none", "tilelang", "cudnn")
OUR_DSA_BACKENDS = ("blockwise", "triton")
DSA_KERNEL_BACKENDS = UPSTREAM_DSA_BACKENDS + OUR_DSA_BACKENDS
# What a CUDA-only backend needs importable (the module names its packages install).
_BACKEND_PACKAGES = {"tilelang": ("tilelang",), "cudnn": ("cudnn",), "triton": ("triton",)}


def default_dsa_kernel_backend() -> str:
    """Triton's kernels where they run (a CUDA device and Triton), else the torch blockwise path:
    O(S·k) memory, the fastest torch path measured on CPU (docs/PERFORMANCE.md)."""
    from model.kernels import triton_importable

    return "triton" if torch.cuda.is_available() and triton_importable() else "blockwise"


def check_dsa_kernel_backend(o: ModelOptions, dims: ParallelDims = SINGLE_PROCESS) -> str:
    """The backend this run uses, or a ValueError naming the flag and what is missing."""
    import importlib.util

    name = o.dsa_kernel_backend or default_dsa_kernel_backend()
    flag = f"--dsa-kernel-backend {name}"
    if name not in DSA_KERNEL_BACKENDS:
        raise ValueError(f"{flag}: unknown; choose one of {', '.join(DSA_KERNEL_BACKENDS)}")
    missing = [p for p in _BACKEND_PACKAGES.get(name, ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise ValueError(f"{flag} needs the package(s) {', '.join(missing)}, which cannot be imported here")
    if name in _BACKEND_PACKAGES and not torch.cuda.is_available():
        raise ValueError(f"{flag} runs CUDA kernels and this machine has no GPU; on CPU use blockwise "
                         "(or none, megatron-core's dense torch path)")
    if name in UPSTREAM_DSA_BACKENDS:
        # megatron-core's AbsorbedMLASelfAttention and DSAttention refuse these (asserts deep in a forward)
        if dims.tp > 1 and not dims.sequence_parallel:
            raise ValueError(f"{flag} (megatron-core's AbsorbedMLASelfAttention) needs --sequence-parallel "
                             f"with --tensor-model-parallel-size {dims.tp}")
        if dims.tp > 1 and o.dsa_indexer_loss_coeff > 0:
            raise ValueError(f"{flag}: megatron-core's DSAttention refuses the indexer loss "
                             "(--dsa-indexer-loss-coeff > 0) with sequence-parallel query shards "
                             f"(--tensor-model-parallel-size {dims.tp}); use blockwise or triton")
    return name


def upstream_index_share(c: GLM5Config, backend: str) -> tuple[int, int]:
    """(dsa_indexer_topk_freq, dsa_indexer_skip_topk_offset) for megatron-core's DSAttention: the
    schedule that builds exactly the config's `indexer_types` (model/index_share.py), or a ValueError
    naming the field and the flag when the list is not such a schedule. Ours take any list: (1, 0)."""
    if backend not in UPSTREAM_DSA_BACKENDS or not c.shares_top_k:
        return 1, 0
    schedule = index_share.megatron_core_schedule(c.layer_indexer_types)
    if schedule is None:
        pattern = "".join("F" if t == index_share.FULL else "S" for t in c.layer_indexer_types)
        raise ValueError(f"--dsa-kernel-backend {backend}: megatron-core's DSAttention shares top-k only on a "
                         "dsa_indexer_topk_freq / dsa_indexer_skip_topk_offset schedule, and the config's "
                         f"indexer_types ({pattern}) is none; use --dsa-kernel-backend blockwise or triton")
    return schedule


FP8_RECIPES = {"delayed": "delayed", "tensorwise": "tensorwise", "blockwise": "blockwise", "mxfp8": "mxfp8"}


def hybrid_pattern(c: GLM5Config, o: ModelOptions, dims: ParallelDims) -> str:
    """The run's hybrid layer pattern: --hybrid-layer-pattern checked against the config, else the
    config's, its pipeline segments those of --pipeline-model-parallel-layout (translated: a stage's
    GLM layers) or an even split over PP x VPP (model/layer_pattern.py)."""
    depths = c.mtp_depths(o.mtp_num_layers)
    if dims.hybrid_pattern is not None:
        dims.validate_hybrid_pattern(c, depths)
        return dims.hybrid_pattern
    stages = layer_pattern.pipeline_stages(c.num_hidden_layers, dims.pp, dims.vpp(c.num_hidden_layers),
                                           dims.pipeline_layout)
    return layer_pattern.derive(c, depths, stages)


def moe_settings(c, o: ModelOptions) -> dict:
    """megatron-core's MoE settings of a GLM-5 family config (GLM5Config or GLM5FlashConfig): sigmoid routing
    with the aux-loss-free expert bias, the shared expert, the `E` layers of the hybrid pattern."""
    return dict(
        num_moe_experts=c.n_routed_experts,
        moe_layer_freq=[m for i in range(c.num_hidden_layers) for m in (0, int(c.is_moe_layer(i)))],  # the `E` layers
        moe_ffn_hidden_size=c.moe_intermediate_size,
        moe_shared_expert_intermediate_size=c.n_shared_experts * c.moe_intermediate_size,
        moe_router_topk=c.num_experts_per_tok,
        moe_router_score_function="sigmoid",
        moe_router_topk_scaling_factor=c.routed_scaling_factor,
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=o.moe_router_bias_update_rate,
        moe_router_dtype=o.moe_router_dtype,
        moe_router_load_balancing_type="seq_aux_loss" if o.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=o.moe_aux_loss_coeff,
        moe_expert_capacity_factor=o.moe_expert_capacity_factor,
        moe_token_dispatcher_type=o.moe_token_dispatcher_type,
        moe_flex_dispatcher_backend=o.moe_flex_dispatcher_backend or "deepep",
        moe_permute_fusion=o.moe_permute_fusion,
        moe_shared_expert_overlap=o.moe_shared_expert_overlap,
        moe_grouped_gemm=o.moe_grouped_gemm,
        # FP8 GEMMs need each expert's token count padded to a multiple of 16 (32 for MXFP8): done
        # once on the routing map by the dispatcher rather than by copies around every expert GEMM.
        moe_router_padding_for_quantization=bool(o.fp8_recipe),
    )


def to_transformer_config(c: GLM5Config, o: ModelOptions, dims: ParallelDims = SINGLE_PROCESS) -> MLATransformerConfig:
    """megatron-core's config of the GLM-5 model on HybridModel (model/builder.py): its layers are
    hybrid layers, two per GLM layer (model/layer_pattern.py), so `num_layers` is twice the GLM count
    (megatron-core sizes its indexer-loss and MoE trackers by it) and IndexShare's topk_freq /
    skip_topk_offset count hybrid layers. `hybrid_layer_pattern`, `glm_num_layers` and
    `padded_vocab_size` (the embedding's and output layer's rows) are set on it. The parallel layout is
    `dims`'s (default: one process)."""
    if getattr(c, "model_type", None) == "glm5_next":  # GLM-5.3-Flash: model/mcore_config_flash.py
        from model.mcore_config_flash import to_flash_transformer_config

        return to_flash_transformer_config(c, o, dims)
    dsa_backend = check_dsa_kernel_backend(o, dims)
    pattern = hybrid_pattern(c, o, dims)
    topk_freq, skip_topk_offset = layer_pattern.hybrid_topk_schedule(*upstream_index_share(c, dsa_backend))
    kwargs = dict(
        # parallel layout
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        # HybridModel takes its stages from the pattern's '|' (megatron-core's layout counts GLM layers)
        virtual_pipeline_model_parallel_size=layer_pattern.virtual_stages(pattern, dims.pp),
        expert_model_parallel_size=dims.ep,
        expert_tensor_parallel_size=dims.expert_tp,
        context_parallel_size=dims.cp,
        # DSA's context parallelism all-gathers the keys (ours: the latent rows, model/modules/cp_attention.py);
        # megatron-core 0.19.2 accepts DSA with CP for this type only
        cp_comm_type="allgather" if dims.cp > 1 else None,
        sequence_parallel=dims.sequence_parallel,
        # precision
        params_dtype=o.params_dtype,
        pipeline_dtype=o.params_dtype,
        bf16=o.bf16,
        fp8="e4m3" if o.fp8_recipe else None,
        fp8_recipe=FP8_RECIPES.get(o.fp8_recipe, "delayed") if o.fp8_recipe else "delayed",
        # sizes
        num_layers=2 * c.num_hidden_layers,
        hidden_size=c.hidden_size,
        ffn_hidden_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_key_value_heads,
        kv_channels=c.qk_head_dim,
        # MLA (D5)
        multi_latent_attention=True,
        q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank,
        qk_head_dim=c.qk_nope_head_dim,
        qk_pos_emb_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim,
        rope_type="rope",
        rotary_base=c.rope_theta,
        mscale_all_dim=0.0,
        mscale=1.0,
        rotary_scaling_factor=1.0,
        apply_rope_fusion=False,
        # the q_a / kv_a latent norms (D1, D2): megatron-core 0.19.2 builds MLA's q_layernorm and
        # kv_layernorm only with qk_layernorm=True (mla_qk_norm_config.py refuses them otherwise)
        qk_layernorm=True,
        # DSA
        experimental_attention_variant="dsa",
        dsa_indexer_n_heads=c.index_n_heads,
        dsa_indexer_head_dim=c.index_head_dim,
        dsa_indexer_topk=o.dsa_indexer_topk or c.index_topk,
        dsa_indexer_loss_coeff=o.dsa_indexer_loss_coeff,
        dsa_indexer_use_sparse_loss=o.dsa_indexer_use_sparse_loss,
        # IndexShare on megatron-core's modules (ours read `glm_indexer_types`, set below)
        dsa_indexer_topk_freq=topk_freq,
        dsa_indexer_skip_topk_offset=skip_topk_offset,
        # GLM-5 as transformers computes it (docs/HF_MAPPING.md): interleaved indexer RoPE, no Hadamard
        # rotation (HF has none; it needs the CUDA-only fast_hadamard_transform), k_norm eps 1e-6 (D2)
        dsa_indexer_rope_interleaved=True,
        dsa_indexer_rotate_activation=False,
        dsa_indexer_k_norm_epsilon=1e-6,
        # block
        normalization="RMSNorm",
        layernorm_epsilon=c.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=c.attention_dropout,
        init_method_std=c.initializer_range,
        **moe_settings(c, o),
        # MTP
        mtp_num_layers=c.mtp_depths(o.mtp_num_layers) or None,
        mtp_use_repeated_layer=o.mtp_use_repeated_layer,
        mtp_loss_scaling_factor=o.mtp_loss_scaling_factor,
        mtp_detach_heads=o.mtp_detach_heads,
        # loss normalized by the global token count (layout-independent losses)
        calculate_per_token_loss=True,
        # model/initialization.py re-initializes every weight layout-invariantly afterwards; megatron's own
        # init must still run: with perform_initialization=False its parallel linears never set
        # the `tensor_model_parallel` attributes that grad clipping and the optimizer rely on.
        perform_initialization=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        recompute_granularity=o.recompute_granularity,
        recompute_modules=o.recompute_modules,
        overlap_p2p_comm=o.overlap_p2p_comm,
        microbatch_group_size_per_vp_stage=dims.microbatch_group_size,
        batch_p2p_comm=o.batch_p2p_comm and not o.overlap_p2p_comm,
        transformer_impl="transformer_engine" if o.use_te else "local",
    )
    if o.recompute_modules is None:
        kwargs.pop("recompute_modules")
    if o.recompute_granularity == "full":  # default: every layer, one at a time (uniform, 1)
        kwargs.update(recompute_method=o.recompute_method or "uniform",
                      recompute_num_layers=o.recompute_num_layers or 1)
    # megatron-core validates its own three values (and refuses CUDA backends without a GPU); ours
    # are written after validation: only model/specs.py and our DSA module read them.
    kwargs["dsa_kernel_backend"] = dsa_backend if dsa_backend in UPSTREAM_DSA_BACKENDS else "none"
    tconfig = MLATransformerConfig(**kwargs)
    tconfig.dsa_kernel_backend = dsa_backend
    # megatron-core 0.19.2 has no such field; model/modules/mtp_objective.py reads it
    tconfig.mtp_loss_type = o.mtp_loss_type
    # per decoder layer (0-based) "full"/"shared": model/specs.py builds our attention from it
    tconfig.glm_indexer_types = tuple(c.layer_indexer_types)
    tconfig.glm_num_layers = c.num_hidden_layers
    tconfig.hybrid_layer_pattern = pattern
    # model/builder.py builds this many embedding and output rows (the checkpoint holds them)
    tconfig.padded_vocab_size = padded_vocab_size(c.vocab_size, divisible_by=o.make_vocab_size_divisible_by,
                                                  tp=dims.tp)
    return tconfig

