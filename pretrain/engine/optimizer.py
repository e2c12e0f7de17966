"""Wrap model chunks in megatron-core's DDP and build its optimizer and LR/WD scheduler; their flags
(Megatron-LM's names; Muon's own --muon-* in pretrain/engine/muon.py)."""

from __future__ import annotations

import argparse

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from data.batch_ramp import BatchRamp
from pretrain.config.train_config import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer and learning-rate schedule")
    g.add_argument("--optimizer", choices=["adam", "muon"], default="adam",
                   help="adam: AdamW for every parameter; muon: Muon for the matrices, AdamW for the rest "
                        "(printed at start-up; docs/MUON.md)")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "WSD"], default="cosine")
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler", action="store_true",
                   help="on --load, this run's LR/WD schedule flags win over the checkpoint's (extending a run)")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   action="store_true", help="on --load, the checkpoint's LR/WD schedule wins over the flags")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")


def check_arguments(args) -> None:
    """Before any work: the optimizer's and the schedule's flags against each other."""
    if args.overlap_param_gather and not args.use_distributed_optimizer:  # Megatron-LM's rule
        raise ValueError("--overlap-param-gather overlaps the distributed optimizer's parameter all-gather: "
                         "add --use-distributed-optimizer, or drop it")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ValueError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler contradict "
                         "each other: give one (the flags win, or the checkpoint does)")
    decay_iters = decay_iterations(args.lr_decay_iters, args.train_iters)
    if args.lr_warmup_iters and args.lr_warmup_iters >= decay_iters:  # megatron's scheduler asserts it
        raise ValueError(f"--lr-warmup-iters {args.lr_warmup_iters} must be below the decay iterations "
                         f"{decay_iters} (--lr-decay-iters, default --train-iters)")
    if not 0 <= args.min_lr <= args.lr:
        raise ValueError(f"--min-lr {args.min_lr} must be between 0 and --lr {args.lr}")


def from_args(args) -> dict:
    """The TrainConfig fields these flags set."""
    names = ("optimizer", "lr", "min_lr", "lr_warmup_iters", "lr_decay_iters", "lr_decay_style",
             "override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler", "weight_decay", "adam_beta1",
             "adam_beta2", "adam_eps", "clip_grad", "use_distributed_optimizer", "overlap_grad_reduce",
             "overlap_param_gather")
    return {name: getattr(args, name) for name in names}


def decay_iterations(lr_decay_iters: int | None, train_iters: int) -> int:
    """The iterations the LR decays over: --lr-decay-iters, default --train-iters (0 saves the initial model)."""
    return max(1, lr_decay_iters or train_iters)


def wrap_precision(chunks, tconfig):
    """bf16: megatron's Float16Module casts every parameter (norms included) to bf16 and the
    outputs back to fp32, as Megatron-LM does; the expert bias stays fp32 inside the router."""
    if not tconfig.bf16:
        return chunks
    from megatron.core.transformer.module import Float16Module

    return [Float16Module(tconfig, chunk) for chunk in chunks]


def shards_grad_buffers(cfg: TrainConfig) -> bool:
    """Whether DDP reduce-scatters gradients into flat shards (megatron's DistributedOptimizer). Muon
    orthogonalizes whole matrices: its --use-distributed-optimizer is megatron-core's layer-wise one, which
    assigns whole parameters to data-parallel ranks over all-reduced gradients (pretrain/engine/muon.py)."""
    return cfg.use_distributed_optimizer and cfg.optimizer != "muon"


def wrap_ddp(chunks, tconfig, cfg: TrainConfig):
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.overlap_grad_reduce,
        overlap_param_gather=cfg.overlap_param_gather and shards_grad_buffers(cfg),
        use_distributed_optimizer=shards_grad_buffers(cfg),
        check_for_nan_in_grad=False,
        bucket_size=None,
    )
    return [
        # Only the first chunk's grads may be bucketed for overlap (Megatron-LM does the same).
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]


# megatron-core's emerging-optimizer name of GLM-5's Muon (parallel/compat/megatron_muon.py registers it)
MUON = "glm5_muon"


def optimizer_config(cfg: TrainConfig, timers=None) -> OptimizerConfig:
    """megatron-core's optimizer options; `timers` (megatron's Timers, pretrain/metrics/timing.py) times its phases."""
    muon = cfg.optimizer == "muon"
    return OptimizerConfig(
        optimizer=MUON if muon else "adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=cfg.model_options.bf16, params_dtype=cfg.model_options.params_dtype,
        use_distributed_optimizer=shards_grad_buffers(cfg),
        use_layer_wise_distributed_optimizer=muon and cfg.use_distributed_optimizer,
        overlap_param_gather=cfg.overlap_param_gather and shards_grad_buffers(cfg),
        log_num_zeros_in_grad=cfg.observability.log_num_zeros_in_grad,
        timers=timers, barrier_with_L1_time=cfg.observability.barrier_with_l1_time,
        **(cfg.muon.optimizer_config_fields() if muon else {}),
    )


def build_optimizer(model, cfg: TrainConfig, gloo_groups: bool = True, timers=None):
    # gloo_groups=False under a fake process group (tools/simulate_layout.py), which has no gloo groups
    config = optimizer_config(cfg, timers)
    if cfg.optimizer == "muon":
        from parallel.compat.megatron_muon import layer_wise_for_any_precision_and_backend, register_muon_variant
        from pretrain.engine import muon

        register_muon_variant(MUON, muon.optimizer_class(), to_adam=lambda p: p.muon_adam)
        if cfg.use_distributed_optimizer:
            layer_wise_for_any_precision_and_backend()
        muon.tag_parameters(model, cfg.muon.split_mla_heads)
    # megatron-core's standard overrides (no weight decay on 1-D parameters) apply to both
    return get_megatron_optimizer(config, model, use_gloo_process_groups=gloo_groups)


def samples_after(iterations: int, cfg: TrainConfig) -> int:
    """Samples consumed by the first `iterations` iterations: the global batch size each, or, under
    --rampup-batch-size, the ramp's batch sizes (data/batch_ramp.py: the trainer's own schedule)."""
    if not cfg.rampup_batch_size:
        return iterations * cfg.global_batch_size
    return BatchRamp(*cfg.rampup_batch_size, cfg.global_batch_size).consumed_before(iterations)


def build_scheduler(optimizer, cfg: TrainConfig) -> OptimizerParamScheduler:
    """Megatron's scheduler counts steps in samples (one optimizer step = one global batch); the
    --lr-warmup-iters / --lr-decay-iters / --train-iters are iterations, also under a batch ramp
    (converted with `samples_after`). On --load, a schedule that differs from the checkpoint's is
    refused unless --override-opt_param-scheduler or --use-checkpoint-opt_param-scheduler says which wins."""
    decay_iters = decay_iterations(cfg.lr_decay_iters, cfg.train_iters)
    decay_samples = samples_after(decay_iters, cfg)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.lr_warmup_iters else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=samples_after(cfg.lr_warmup_iters, cfg),
        lr_decay_steps=decay_samples,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay_samples,
        wd_incr_style="constant",
        # the last 20% of the decay iterations (long after any ramp: at the full batch size)
        wsd_decay_steps=(decay_iters * cfg.global_batch_size) // 5 if cfg.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if cfg.lr_decay_style == "WSD" else None,
        use_checkpoint_opt_param_scheduler=cfg.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=cfg.override_opt_param_scheduler,
    )


# What megatron's scheduler checks against a checkpoint (its state_dict keys), as the user knows them.
_SCHEDULE_FIELDS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "warm-up samples",
                    "lr_decay_steps": "decay samples", "lr_decay_style": "--lr-decay-style",
                    "start_wd": "--weight-decay", "end_wd": "--weight-decay (end)",
                    "wd_incr_steps": "weight-decay samples", "wd_incr_style": "weight-decay style"}


def schedule_differences(scheduler: OptimizerParamScheduler, saved: dict) -> list[str]:
    """Where this run's LR/WD schedule differs from a checkpoint's (its scheduler state), unless a
    flag said which wins (then megatron's load_state_dict applies that choice)."""
    if scheduler.override_opt_param_scheduler or scheduler.use_checkpoint_opt_param_scheduler:
        return []
    ours = scheduler.state_dict()
    return [f"{name}: {saved[key]} in the checkpoint, {ours[key]} now" for key, name in _SCHEDULE_FIELDS.items()
            if key in saved and saved[key] != ours[key]]
