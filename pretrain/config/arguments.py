"""Command-line flags (Megatron-LM's names) -> TrainConfig, validated before any work starts."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time

import torch

from data.batch_ramp import check_rampup_batch_size
from model import transformer_impl
from model.config import DEFAULT_VOCAB_DIVISIBLE_BY, GLM5Config, padded_vocab_size
from model.mcore_config import DSA_KERNEL_BACKENDS, FP8_RECIPES, ModelOptions, check_dsa_kernel_backend
from model.modules.mtp_objective import MTP_LOSS_TYPES
from model.presets import DEFAULT_SEQ_LENGTH, PRESETS, get_preset
from parallel import dims as parallel_dims
from parallel.dims import ParallelDims
from pretrain.checkpoint import bridge_format, stages
from pretrain.engine import muon, optimizer
from pretrain.metrics import config as observability
from pretrain.config.train_config import TrainConfig
from pretrain.recipe import RecipeConfig, TokenSchedule


# Every rank finds the same start-up error: rank 0 says it, the others wait this long first, so that
# torchrun's teardown (it ends the other ranks when one exits) never ends rank 0 before it has spoken. Long
# enough for a rank 0 that is seconds behind (a loaded node, a slow import) and slow to exit; it delays only
# an error that rank 0 did not have.
OTHER_RANKS_WAIT_S = 30.0


def exit_with_error(prog: str, message: str) -> None:
    """One line `PROG: error: MESSAGE` from rank 0, exit status 2. Another rank waits first (torchrun
    ends it when rank 0 exits); if it is still running, its error was its own and it says it."""
    rank = int(os.environ.get("RANK", "0"))
    if rank:
        time.sleep(OTHER_RANKS_WAIT_S)
    print(f"{prog}: error: {message}" + (f" (rank {rank})" if rank else ""), file=sys.stderr, flush=True)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's (unknown flags, bad values): the same one line, once
        exit_with_error(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Pretrain a GLM-5 model on megatron-core.", allow_abbrev=False,  # as Megatron-LM
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="tiny", help=f"one of {sorted(PRESETS)}")
    g.add_argument("--model-config", default=None, help="an HF config.json (overrides --preset)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="your tokenizer's vocabulary size: the model's vocab_size becomes this, padded to a "
                        "multiple of --make-vocab-size-divisible-by x TP (Megatron-LM's rule)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=DEFAULT_VOCAB_DIVISIBLE_BY,
                   help="pad --vocab-size to a multiple of this x --tensor-model-parallel-size")
    g.add_argument("--seq-length", type=int, default=None, help="default: the preset's")
    g.add_argument("--dsa-indexer-topk", type=int, default=None, help="override index_topk")
    g.add_argument("--dsa-indexer-loss-coeff", type=float, default=0.0)
    g.add_argument("--dsa-indexer-use-sparse-loss", action="store_true")
    g.add_argument("--dsa-kernel-backend", default=None, choices=DSA_KERNEL_BACKENDS,
                   help="DSA attention: megatron-core's modules with its kernels (none: dense torch, "
                        "tilelang, cudnn) or ours (blockwise: O(S·k) torch, triton); default: triton on a "
                        "GPU with Triton, else blockwise (docs/MODEL.md)")
    g.add_argument("--mtp-loss-scaling-factor", default="0.3",
                   help="MTP loss weight, or a schedule by consumed tokens: '0.3,10T:0.1'")
    g.add_argument("--mtp-num-layers", type=int, default=None,
                   help="MTP depths (future tokens predicted); default: the model's MTP layers (GLM-5: 1). More "
                        "than the model holds needs --mtp-use-repeated-layer (GLM-5's recipe: 3 with it)")
    g.add_argument("--mtp-use-repeated-layer", action="store_true",
                   help="one MTP layer's parameters applied at every --mtp-num-layers depth (the checkpoint and "
                        "the HF export hold one layer)")
    g.add_argument("--mtp-loss-type", choices=MTP_LOSS_TYPES, default="ce",
                   help="MTP depths' objective: per-depth cross-entropy, or GLM-5.2's end-to-end total-variation "
                        "loss on the draft chain's acceptance (Bebop, arXiv 2606.12370; docs/MODEL.md)")
    g.add_argument("--mtp-detach-heads", action="store_true",
                   help="no MTP gradient reaches the main model: the MTP layer's input, the embedding and the "
                        "output head are detached for it (megatron-core's mtp_detach_heads; GLM-5.2 with e2e_tv)")
    g.add_argument("--moe-router-bias-update-rate", default="1e-3",
                   help="expert-bias update speed gamma, or a schedule: '1e-3,28T:0'")
    g.add_argument("--dsa-warmup-iters", type=int, default=0,
                   help="dense warm-up iterations in which only the DSA indexer trains (KL loss)")
    g.add_argument("--dsa-warmup-lr", type=float, default=None, help="learning rate during the DSA warm-up")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None,
                   help="drop tokens beyond this x the balanced load per expert (default: dropless)")
    g.add_argument("--transformer-impl", choices=list(transformer_impl.IMPLS), default=None,
                   help="Transformer Engine or megatron-core's local modules "
                        "(default: transformer_engine when TE and a GPU are present, else local)")
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="TE's grouped GEMM for the experts (needs --transformer-impl transformer_engine)")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="full: recompute whole layers in backward; selective: only --recompute-modules")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="with full: recompute every layer in chunks of --recompute-num-layers (uniform), or only "
                        "the first --recompute-num-layers layers of each pipeline stage (block); default uniform")
    g.add_argument("--recompute-num-layers", type=int, default=None, help="with full (default 1)")
    g.add_argument("--recompute-modules", nargs="+", default=None,
                   help="with selective: megatron-core's module names (default core_attn)")

    g = parallel_dims.add_arguments(p)  # the layout's flags; this group's others are the engine's
    g.add_argument("--cp-comm-type", default=None,
                   help="context parallelism's collective: DSA all-gathers the keys, so allgather (the default) only")
    g.add_argument("--moe-token-dispatcher-type", choices=["alltoall", "allgather", "flex"], default="alltoall",
                   help="how tokens reach their experts; flex runs --moe-flex-dispatcher-backend (CUDA only)")
    g.add_argument("--moe-flex-dispatcher-backend", choices=["deepep", "hybridep"], default=None,
                   help="with --moe-token-dispatcher-type flex: DeepEP or HybridEP (their packages, CUDA)")
    g.add_argument("--moe-router-dtype", choices=["fp32", "fp64"], default="fp32",
                   help="the router's logits and top-k in this precision")
    g.add_argument("--moe-permute-fusion", action="store_true",
                   help="Transformer Engine's fused token permutation (needs TE)")
    g.add_argument("--moe-shared-expert-overlap", action="store_true",
                   help="run the shared expert beside the token dispatch (alltoall or flex dispatcher)")
    g.add_argument("--overlap-p2p-comm", action="store_true")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0)
    g.add_argument("--dp-engine", choices=["megatron", "deepspeed"], default="megatron",
                   help="who reduces gradients and partitions optimizer state: megatron-core's DDP and "
                        "distributed optimizer, or DeepSpeed ZeRO (no pipeline parallelism)")
    g.add_argument("--zero-stage", type=int, choices=[1, 2], default=2, help="with --dp-engine deepspeed")
    g.add_argument("--zero-offload-optimizer", action="store_true",
                   help="with --dp-engine deepspeed: keep the optimizer state in CPU memory")

    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp8-recipe", choices=sorted(FP8_RECIPES), default=None)

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="accepted for Megatron-LM's command lines: losses are always normalized by the global "
                        "token count here (layout-independent)")
    g.add_argument("--rampup-batch-size", nargs=3, type=int, default=None,
                   metavar=("START", "INCREMENT", "RAMPUP_SAMPLES"),
                   help="grow the global batch from START by INCREMENT over RAMPUP_SAMPLES sequences")
    g.add_argument("--train-iters", type=int, default=20)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--max-consecutive-skipped-iters", type=int, default=5,
                   help="stop after this many consecutive steps skipped for non-finite gradients")
    g.add_argument("--loss-spike-factor", type=float, default=None,
                   help="log a loss spike when lm loss exceeds this x its running mean")
    g.add_argument("--skip-loss-spikes", action="store_true", help="also skip the optimizer step on a spike")

    g = p.add_argument_group("data")
    g.add_argument("--mock-data", action="store_true", help="deterministic synthetic batches from --seed")
    g.add_argument("--data-path", nargs="+", default=[], help="manifest.json paths, optionally weighted")
    g.add_argument("--tokenizer", default=None, help="HF tokenizer dir, checked against the manifests")
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--skip-bad-shards", action="store_true")
    g.add_argument("--data-allow-pipe", action="store_true",
                   help="accept pipe: shard locations in manifests (they run commands; refused by default)")
    g.add_argument("--valid-data-path", nargs="+", default=[],
                   help="validation manifest.json paths, optionally weighted (as --data-path)")
    g.add_argument("--eod-mask-loss", action="store_true",
                   help="no loss at positions whose input is the EOD token (Megatron-LM's rule)")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="RoPE positions (attention's and the DSA indexer's) restart at each document (after EOD)")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="no attention across documents: DSA's top-k, sparse attention and indexer loss "
                        "stay inside each document (--dsa-kernel-backend blockwise or triton)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-interval", type=int, default=None,
                   help="evaluate on the validation set every N iterations and at the end of training")
    g.add_argument("--eval-iters", type=int, default=100,
                   help="global batches per evaluation (the same ones every time)")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints from a background process while training continues")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving, with --save) once the iteration is a multiple of this")
    observability.add_arguments(p)
    optimizer.add_arguments(p)
    muon.add_arguments(p)
    stages.add_arguments(p)
    return p


def _model_config(args) -> GLM5Config:
    if args.model_config:
        from model.config import read_hf_json
        from model.config_flash import config_from_hf_dict

        cfg = config_from_hf_dict(read_hf_json(args.model_config))  # GLM-5's or GLM-5.3-Flash's
    elif args.load and (bridge := bridge_model_config(args.load)) is not None:
        cfg = bridge  # a Megatron-Bridge checkpoint's run_config.yaml (over --preset)
    else:
        cfg = get_preset(args.preset)
    return with_vocab_size(cfg, args)


def with_vocab_size(cfg: GLM5Config, args) -> GLM5Config:
    """`cfg` with --vocab-size (the tokenizer's), padded to a multiple of --make-vocab-size-divisible-by x TP."""
    if args.vocab_size is None:
        return cfg
    return dataclasses.replace(cfg, vocab_size=padded_vocab_size(
        args.vocab_size, divisible_by=args.make_vocab_size_divisible_by, tp=args.tensor_model_parallel_size))


def bridge_model_config(root: str) -> GLM5Config | None:
    """The model config of the Megatron-Bridge checkpoint at `root` (None when it is not one)."""
    from pretrain.checkpoint.run_state import CheckpointError, iter_dir, latest_iteration, read_run_state

    try:
        iteration = latest_iteration(root)
    except CheckpointError:
        return None  # not a usable checkpoint of either kind: the load reports it
    if iteration is None or not bridge_format.is_bridge_iteration(iter_dir(root, iteration)):
        return None
    try:
        return GLM5Config.from_hf_dict(read_run_state(root, iteration)[1]["model_config"])
    except CheckpointError as e:
        raise ValueError(str(e)) from None


def parse_args(argv: list[str] | None = None, world_size: int = 1) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, world_size)
        _check_run_inputs(args)
        return cfg
    except ValueError as e:
        exit_with_error(parser.prog, str(e))


def _check_run_inputs(args) -> None:
    """What a training run reads and the planning tools (model_info, simulate_layout: config_from_args on
    a recipe written for the cluster) do not."""
    if args.tokenizer is not None and not os.path.isdir(args.tokenizer):
        raise ValueError(f"--tokenizer {args.tokenizer} is not a directory (a Hugging Face tokenizer directory)")


def config_from_args(args, world_size: int) -> TrainConfig:
    cfg = _model_config(args)
    if args.seq_length is not None and args.seq_length <= 0:
        raise ValueError(f"--seq-length {args.seq_length} must be positive (leave it out for the preset's "
                         f"{DEFAULT_SEQ_LENGTH.get(args.preset, 4096)})")
    if args.train_iters < 1:
        raise ValueError(f"--train-iters {args.train_iters} must be at least 1")
    seq_length = args.seq_length or DEFAULT_SEQ_LENGTH.get(args.preset, 4096)
    if args.mock_data == bool(args.data_path):
        raise ValueError("give exactly one of --mock-data and --data-path")
    _check_document_flags(args)
    optimizer.check_arguments(args)
    _check_evaluation(args)
    stages.check_arguments(args)
    if args.fp8_recipe and not (torch.cuda.is_available() and transformer_impl.te_available()):
        raise ValueError(f"--fp8-recipe {args.fp8_recipe} needs a GPU with Transformer Engine; "
                         f"{'Transformer Engine is not installed' if torch.cuda.is_available() else 'no GPU is present'}")
    use_te = transformer_impl.resolve(args.transformer_impl) == "transformer_engine"
    for flag, on in (("--fp8-recipe", args.fp8_recipe), ("--moe-grouped-gemm", args.moe_grouped_gemm)):
        if on and not use_te:  # megatron's non-TE grouped experts need the deprecated grouped_gemm package
            raise ValueError(f"{flag} needs --transformer-impl transformer_engine (this run: local)")
    _check_recompute(args, cfg)
    if args.fp8_recipe == "mxfp8" and torch.cuda.get_device_capability() < (10, 0):
        raise ValueError(f"--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability 10.x); this "
                         f"{torch.cuda.get_device_name()} is {torch.cuda.get_device_capability()}: use blockwise")
    if (args.save_interval is not None or args.async_save) and not args.save:
        raise ValueError(f"{'--save-interval' if args.save_interval is not None else '--async-save'} needs --save DIR")
    _check_mtp(args, cfg)
    dims = ParallelDims.from_args(args, world_size)
    dims.validate(cfg, seq_length, args.micro_batch_size, args.global_batch_size, args.mtp_num_layers)
    mtp_schedule = TokenSchedule.parse(args.mtp_loss_scaling_factor, "--mtp-loss-scaling-factor")
    bias_schedule = TokenSchedule.parse(args.moe_router_bias_update_rate, "--moe-router-bias-update-rate")
    if args.moe_expert_capacity_factor is not None and args.moe_expert_capacity_factor <= 0:
        raise ValueError(f"--moe-expert-capacity-factor {args.moe_expert_capacity_factor} must be positive")
    if args.dsa_warmup_iters and args.dsa_indexer_loss_coeff <= 0:
        raise ValueError("--dsa-warmup-iters trains the indexer with its KL loss: "
                         "set --dsa-indexer-loss-coeff > 0")
    if args.rampup_batch_size:  # before any work; megatron-core would assert later, mid start-up
        check_rampup_batch_size(args.rampup_batch_size, args.global_batch_size, unit=args.micro_batch_size * dims.dp)
    muon.check_arguments(args)
    _check_dp_engine(args, dims)
    _check_moe_and_cp_engine(args, dims, use_te)
    observed = observability.from_args(args, world_size)
    options = ModelOptions(
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32, bf16=args.bf16,
        fp8_recipe=args.fp8_recipe, use_te=use_te, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        dsa_indexer_topk=args.dsa_indexer_topk, dsa_indexer_loss_coeff=args.dsa_indexer_loss_coeff,
        dsa_indexer_use_sparse_loss=args.dsa_indexer_use_sparse_loss, dsa_kernel_backend=args.dsa_kernel_backend,
        mtp_loss_scaling_factor=mtp_schedule(0),
        mtp_num_layers=args.mtp_num_layers, mtp_use_repeated_layer=args.mtp_use_repeated_layer,
        mtp_loss_type=args.mtp_loss_type, mtp_detach_heads=args.mtp_detach_heads,
        moe_router_bias_update_rate=bias_schedule(0),
        moe_aux_loss_coeff=args.moe_aux_loss_coeff, moe_expert_capacity_factor=args.moe_expert_capacity_factor,
        moe_grouped_gemm=args.moe_grouped_gemm, moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_flex_dispatcher_backend=args.moe_flex_dispatcher_backend, moe_router_dtype=args.moe_router_dtype,
        moe_permute_fusion=args.moe_permute_fusion, moe_shared_expert_overlap=args.moe_shared_expert_overlap,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers, recompute_modules=args.recompute_modules,
        overlap_p2p_comm=args.overlap_p2p_comm, batch_p2p_comm=torch.cuda.is_available(),
    )
    check_dsa_kernel_backend(options, dims)  # a refusal names the flag before any work
    if getattr(cfg, "model_type", None) == "glm5_next":  # GLM-5.3-Flash: what is not built yet, by name
        from model.mcore_config_flash import check_flash_options

        check_flash_options(cfg, options, dims)
    train_config = TrainConfig(
        model=cfg, model_options=options, dims=dims, preset=args.preset, seq_length=seq_length,
        recipe=RecipeConfig(mtp_loss_scaling=mtp_schedule, bias_update_rate=bias_schedule,
                            dsa_warmup_iters=args.dsa_warmup_iters, dsa_warmup_lr=args.dsa_warmup_lr,
                            dsa_sparse_loss=args.dsa_indexer_use_sparse_loss),
        rampup_batch_size=args.rampup_batch_size,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        train_iters=args.train_iters, **optimizer.from_args(args), muon=muon.MuonOptions.from_args(args),
        dp_engine=args.dp_engine, zero_stage=args.zero_stage,
        zero_offload_optimizer=args.zero_offload_optimizer, seed=args.seed, mock_data=args.mock_data,
        data_path=args.data_path, tokenizer=args.tokenizer, num_workers=args.num_workers,
        skip_bad_shards=args.skip_bad_shards, data_allow_pipe=args.data_allow_pipe, log_interval=args.log_interval,
        valid_data_path=args.valid_data_path, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        eod_mask_loss=args.eod_mask_loss, reset_attention_mask=args.reset_attention_mask,
        reset_position_ids=args.reset_position_ids,
        tensorboard_dir=args.tensorboard_dir, observability=observed, save=args.save, load=args.load,
        load_options=stages.LoadOptions.from_args(args),
        save_interval=args.save_interval,
        async_save=args.async_save,
        exit_interval=args.exit_interval, max_consecutive_skipped_iters=args.max_consecutive_skipped_iters,
        loss_spike_factor=args.loss_spike_factor, skip_loss_spikes=args.skip_loss_spikes,
        distributed_timeout_s=args.distributed_timeout_minutes * 60,
    )
    from pretrain.evaluate import check_validation_set

    check_validation_set(train_config)
    return train_config


def _check_mtp(args, cfg: GLM5Config) -> None:
    """--mtp-num-layers / --mtp-use-repeated-layer against the model's MTP layers (what its checkpoint holds)."""
    held = cfg.num_nextn_predict_layers
    n = args.mtp_num_layers
    for flag, on in (("--mtp-use-repeated-layer", args.mtp_use_repeated_layer),
                     ("--mtp-loss-type e2e_tv", args.mtp_loss_type == "e2e_tv"),
                     ("--mtp-detach-heads", args.mtp_detach_heads)):
        if on and not held:
            raise ValueError(f"{flag}: this model has no MTP layer (num_nextn_predict_layers 0)")
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--mtp-num-layers {n} must be at least 1 (the model's MTP layers: {held})")
    if not held:
        raise ValueError(f"--mtp-num-layers {n}: this model has no MTP layer (num_nextn_predict_layers 0)")
    if n != held and not args.mtp_use_repeated_layer:
        raise ValueError(f"--mtp-num-layers {n}: the model holds {held} MTP layer(s) (num_nextn_predict_layers); "
                         "add --mtp-use-repeated-layer to apply its layer at every depth (GLM-5's recipe)")


def _check_document_flags(args) -> None:
    # Our DSA (blockwise, triton) keeps attention, the indexer's top-k and its loss inside each document
    # and restarts RoPE per document (model/modules/documents.py). megatron-core's DSAttention does so only
    # for THD-packed micro-batches (PackedSeqParams: batch 1, each document split over CP on its own),
    # a data layout this trainer does not build: refused by name rather than silently ignored.
    from model.mcore_config import UPSTREAM_DSA_BACKENDS

    for flag in ("--reset-attention-mask", "--reset-position-ids"):
        if getattr(args, flag[2:].replace("-", "_")) and args.dsa_kernel_backend in UPSTREAM_DSA_BACKENDS:
            raise ValueError(f"{flag} with --dsa-kernel-backend {args.dsa_kernel_backend}: megatron-core's DSA "
                             "takes packed documents only as THD micro-batches (PackedSeqParams), which this "
                             "trainer does not build; use --dsa-kernel-backend blockwise or triton")


def _check_evaluation(args) -> None:
    if args.eval_interval is None:
        if args.valid_data_path:
            raise ValueError("--valid-data-path is read for evaluation only: add --eval-interval N")
        return
    if args.eval_interval <= 0 or args.eval_iters <= 0:
        raise ValueError(f"--eval-interval {args.eval_interval} and --eval-iters {args.eval_iters} must be positive")
    if args.data_path and not args.valid_data_path:
        raise ValueError("--eval-interval with --data-path needs a validation set: --valid-data-path "
                         "MANIFEST (tools/preprocess_data.py --valid-fraction writes one)")
    if args.mock_data and args.valid_data_path:
        raise ValueError("--valid-data-path with --mock-data: evaluation uses a held-out mock stream; drop one")


def _check_recompute(args, cfg: GLM5Config) -> None:
    full, selective = args.recompute_granularity == "full", args.recompute_granularity == "selective"
    for flag, value in (("--recompute-method", args.recompute_method),
                        ("--recompute-num-layers", args.recompute_num_layers)):
        if value is not None and not full:
            raise ValueError(f"{flag} {value} needs --recompute-granularity full")
    if args.recompute_modules is not None and not selective:
        raise ValueError("--recompute-modules needs --recompute-granularity selective")
    n = args.recompute_num_layers
    if n is not None and not 1 <= n <= cfg.num_hidden_layers:
        raise ValueError(f"--recompute-num-layers {n} must be between 1 and the model's "
                         f"{cfg.num_hidden_layers} layers")
    allowed = {"core_attn", "mla_up_proj", "layernorm", "mlp", "moe", "shared_experts", "moe_act"}
    bad = sorted(set(args.recompute_modules or []) - allowed)
    if bad:
        raise ValueError(f"--recompute-modules {' '.join(bad)}: choose from {', '.join(sorted(allowed))}")
    if "moe_act" in (args.recompute_modules or []) and not args.moe_grouped_gemm:
        raise ValueError("--recompute-modules moe_act needs --moe-grouped-gemm (megatron-core recomputes "
                         "the activation of grouped experts only)")


def _check_moe_and_cp_engine(args, dims: ParallelDims, use_te: bool) -> None:
    """megatron-core 0.19.2's MoE dispatch and CP options: what needs CUDA or a missing package is refused
    here, by name, before any work (megatron would fail mid start-up or at the first step)."""
    if args.cp_comm_type is not None and args.cp_comm_type.replace("_", "").lower() != "allgather":
        raise ValueError(f"--cp-comm-type {args.cp_comm_type}: DSA's context parallelism all-gathers the keys "
                         "(model/modules/cp_attention.py); use allgather")
    flex = args.moe_token_dispatcher_type == "flex"
    if args.moe_flex_dispatcher_backend and not flex:
        raise ValueError(f"--moe-flex-dispatcher-backend {args.moe_flex_dispatcher_backend} needs "
                         "--moe-token-dispatcher-type flex")
    if flex:
        backend = args.moe_flex_dispatcher_backend or "deepep"
        package = {"deepep": "deep_ep", "hybridep": "deep_ep"}[backend]  # HybridEP ships inside DeepEP
        if not torch.cuda.is_available():
            raise ValueError(f"--moe-token-dispatcher-type flex ({backend}) needs CUDA GPUs")
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"--moe-token-dispatcher-type flex --moe-flex-dispatcher-backend {backend}: "
                             f"the {package} package is not installed")
        if backend == "deepep" and dims.tp * dims.ep == 1:
            raise ValueError("--moe-flex-dispatcher-backend deepep needs --tensor-model-parallel-size x "
                             "--expert-model-parallel-size > 1")
    if args.moe_permute_fusion and not transformer_impl.te_available():
        raise ValueError("--moe-permute-fusion uses Transformer Engine's fused permutation: TE is not installed")
    if args.moe_shared_expert_overlap and args.moe_token_dispatcher_type == "allgather":
        raise ValueError("--moe-shared-expert-overlap works with --moe-token-dispatcher-type alltoall or flex "
                         "(this run: allgather)")


def _check_dp_engine(args, dims: ParallelDims) -> None:
    if args.dp_engine != "deepspeed":
        if args.zero_offload_optimizer:
            raise ValueError("--zero-offload-optimizer needs --dp-engine deepspeed")
        return
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--dp-engine deepspeed: DeepSpeed is not installed ({e}); "
                         "pip install -e .[deepspeed]") from e
    refused = {
        "--pipeline-model-parallel-size > 1": dims.pp > 1,
        "--use-distributed-optimizer (ZeRO partitions the optimizer state itself)": args.use_distributed_optimizer,
        "--optimizer muon (ZeRO partitions flattened parameters: Muon needs whole matrices)": args.optimizer == "muon",
        "--overlap-grad-reduce / --overlap-param-gather (megatron DDP options)":
            args.overlap_grad_reduce or args.overlap_param_gather,
        "--skip-loss-spikes (ZeRO-2 has reduced the gradients by then)": args.skip_loss_spikes,
    }
    bad = [name for name, hit in refused.items() if hit]
    if bad:
        raise ValueError("--dp-engine deepspeed does not work with " + "; ".join(bad)
                         + ": use the default --dp-engine megatron")
