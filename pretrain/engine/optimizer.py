"""Wrap model chunks in megatron-core's DDP and build its optimizer and LR/WD scheduler."""

from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from data.batch_ramp import BatchRamp
from pretrain.config.train_config import TrainConfig


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
    decay_iters = max(1, cfg.lr_decay_iters or cfg.train_iters)  # --train-iters 0 saves the initial model
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
