"""GLM5FlashConfig + run options -> megatron-core's MLATransformerConfig for GLM-5.3-Flash on HybridModel.

The hybrid layer pattern (`flash_pattern`): each GLM-5.3-Flash layer is two hybrid layers, its mixer then its
MLP -- `G` (the GDN slot of HybridStack: KDA here) or `D` (NoPE MLA over the pooled-key DSA indexer), then
`-` (dense clamped SwiGLU) or `E` (MoE). Each hybrid layer carries its own mHC (transformers' attn_hc,
ffn_hc), so the hyper-connections fall on hybrid-layer boundaries exactly.

What is refused, by name and why (`check_flash_options`), is what has not been proven equal to one process
or to transformers yet.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import MLATransformerConfig

from model import index_share
from model.config_flash import GLM5FlashConfig
from model.config import padded_vocab_size
from model.mcore_config import SINGLE_PROCESS, ModelOptions, moe_settings
from parallel.dims import ParallelDims
from model.modules.clamped_swiglu import mcore_settings

KDA, DSA, DENSE, MOE, PIPE = "G", "D", "-", "E", "|"


def flash_pattern(cfg: GLM5FlashConfig, stages: list[list[int]] | None = None) -> str:
    """The config's pattern; `stages`: the GLM layers (0-based) of each pipeline segment, joined by '|'."""
    stages = stages or [list(range(cfg.num_hidden_layers))]
    return PIPE.join("".join((KDA if cfg.is_linear_layer(i) else DSA) + (MOE if cfg.is_moe_layer(i) else DENSE)
                             for i in layers) for layers in stages)


def check_flash_pattern(pattern: str, cfg: GLM5FlashConfig, pp: int, flag: str = "--hybrid-layer-pattern") -> None:
    """A ValueError naming `flag` unless `pattern` is the config's layers (MTP none), cut by '|' into PP
    segments (one per stage: virtual stages are not built for GLM-5.3-Flash yet)."""
    want = flash_pattern(cfg)
    if "/" in pattern:
        raise ValueError(f"{flag} {pattern!r}: GLM-5.3-Flash's MTP layer is not built yet (no '/' part)")
    if pattern.replace(PIPE, "") != want:
        raise ValueError(f"{flag} {pattern!r}: the config's {cfg.num_hidden_layers} GLM-5.3-Flash layers are "
                         f"{want!r} ('G' KDA or 'D' MLA + pooled DSA, then '-' MLP or 'E' MoE; '|' between stages)")
    if pattern.count(PIPE) + 1 != pp:
        raise ValueError(f"{flag} {pattern!r}: {pattern.count(PIPE) + 1} segment(s) for --pipeline-model-parallel-size "
                         f"{pp}: one per stage (virtual pipeline stages are not built for GLM-5.3-Flash yet)")


MTP_NOTE = ("GLM-5.3-Flash: the config's MTP layer (num_nextn_predict_layers={n}) is not built yet: the model "
            "trains its main next-token objective only, and a checkpoint of it holds no MTP layer")


def run_pattern(cfg: GLM5FlashConfig, dims: ParallelDims) -> str:
    """--hybrid-layer-pattern checked against the config, else the config's layers split evenly over PP."""
    pp = dims.pp
    if dims.hybrid_pattern is not None:
        check_flash_pattern(dims.hybrid_pattern, cfg, pp)
        return dims.hybrid_pattern
    n = cfg.num_hidden_layers
    if n % pp:
        example = flash_pattern(cfg, [list(range(n // 2)), list(range(n // 2, n))])
        raise ValueError(f"--pipeline-model-parallel-size {pp}: GLM-5.3-Flash's {n} layers do not split evenly; "
                         f"give the stages as --hybrid-layer-pattern (two stages, e.g. {example!r})")
    return flash_pattern(cfg, [list(range(k * (n // pp), (k + 1) * (n // pp))) for k in range(pp)])


def check_flash_options(cfg: GLM5FlashConfig, o: ModelOptions, dims: ParallelDims = SINGLE_PROCESS) -> str:
    """A ValueError naming the flag and the reason for every layout GLM-5.3-Flash does not run yet; else the
    run's hybrid layer pattern."""
    mtp_depths = o.mtp_num_layers or 0
    refusals = [
        (dims.tp > 1, f"--tensor-model-parallel-size {dims.tp}",
         "KDA's fused in_proj / conv and the pooled indexer are not yet split over TP ranks"),
        (dims.layers_per_virtual_stage is not None or dims.pipeline_layout is not None,
         "--num-layers-per-virtual-pipeline-stage / --pipeline-model-parallel-layout",
         "virtual pipeline stages are not built for GLM-5.3-Flash yet; give its stages as --hybrid-layer-pattern"),
        (dims.cp > 1, f"--context-parallel-size {dims.cp}",
         "the KDA state and convolution window are not yet carried across CP ranks"),
        (dims.sequence_parallel, "--sequence-parallel", "needs TP > 1, not supported yet"),
        (bool(o.fp8_recipe), f"--fp8-recipe {o.fp8_recipe}", "not tried on the KDA / mHC layers"),
        (o.use_te, "--transformer-impl transformer_engine",
         "the Flash spec is built from the local backend only so far"),
        (mtp_depths > 0, f"--mtp-num-layers {mtp_depths}",
         "GLM-5.3-Flash's MTP layer (with its own mHC) is not built yet: leave the flag out to train without it"),
        (o.mtp_use_repeated_layer, "--mtp-use-repeated-layer", "GLM-5.3-Flash's MTP layer is not built yet"),
        (o.dsa_indexer_loss_coeff > 0, f"--dsa-indexer-loss-coeff {o.dsa_indexer_loss_coeff}",
         "the pooled indexer's KL loss is not implemented (transformers has no reference: its indexer runs "
         "under no_grad)"),
        (o.recompute_granularity == "selective", "--recompute-granularity selective",
         "no selective recompute modules are defined for KDA / mHC"),
    ]
    for refused, flag, why in refusals:
        if refused:
            raise ValueError(f"GLM-5.3-Flash: {flag} is not supported yet: {why}")
    if index_share.SHARED in cfg.indexer_types:
        raise ValueError("GLM-5.3-Flash: indexer_types with 'shared' layers (IndexShare) are not built yet on "
                         "HybridModel; this config has " + ",".join(cfg.indexer_types))
    return run_pattern(cfg, dims)


def to_flash_transformer_config(cfg: GLM5FlashConfig, o: ModelOptions,
                                dims: ParallelDims = SINGLE_PROCESS) -> MLATransformerConfig:
    """megatron-core's config for the Flash HybridModel: two hybrid layers per GLM layer (num_layers is
    their count, as for GLM-5), NoPE MLA (qk_pos_emb_head_dim 0), the clamped SwiGLU, sigmoid routing."""
    pattern = check_flash_options(cfg, o, dims)
    pp = dims.pp
    tconfig = MLATransformerConfig(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        expert_model_parallel_size=dims.ep,
        expert_tensor_parallel_size=dims.expert_tp,
        params_dtype=o.params_dtype,
        pipeline_dtype=o.params_dtype,
        bf16=o.bf16,
        num_layers=2 * cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.qk_head_dim,
        multi_latent_attention=True,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_head_dim=cfg.qk_nope_head_dim,
        qk_pos_emb_head_dim=0,  # NoPE: megatron's MLA runs with empty rotary dims
        v_head_dim=cfg.v_head_dim,
        rope_type="rope",
        mscale_all_dim=0.0,
        mscale=1.0,
        rotary_scaling_factor=1.0,
        apply_rope_fusion=False,
        qk_layernorm=True,  # MLA's q_a / kv_a latent norms (eps rms_norm_eps, as transformers')
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.initializer_range,
        **mcore_settings(cfg.swiglu_limit),
        **moe_settings(cfg, o),
        calculate_per_token_loss=True,
        perform_initialization=True,
        use_cpu_initialization=True,
        recompute_granularity=o.recompute_granularity,
        **(dict(recompute_method=o.recompute_method or "uniform", recompute_num_layers=o.recompute_num_layers or 1)
           if o.recompute_granularity == "full" else {}),
        transformer_impl="local",
    )
    # the p2p messages between stages are the mHC streams, [s, b, hc_mult x hidden], not megatron's
    # [s, b, hidden]: its schedules then send each message's shape first (p2p_communication.py)
    tconfig.variable_seq_lengths = pp > 1
    tconfig.hybrid_layer_pattern = pattern
    tconfig.glm_num_layers = cfg.num_hidden_layers
    tconfig.padded_vocab_size = padded_vocab_size(cfg.vocab_size, divisible_by=o.make_vocab_size_divisible_by,
                                                  tp=dims.tp)
    tconfig.flash = cfg  # read by model/specs_flash.py's modules (KDA, mHC, the pooled indexer)
    return tconfig
