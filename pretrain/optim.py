"""Wrap model chunks in megatron-core's DDP and build its optimizer and LR/WD scheduler."""

from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from pretrain.config import TrainConfig


def wrap_precision(chunks, tconfig):
    """bf16: megatron's Float16Module casts every parameter (norms included) to bf16 and the
    outputs back to fp32, as Megatron-LM does; the expert bias stays fp32 inside the router."""
    if not tconfig.bf16:
        return chunks
    from megatron.core.transformer.module import Float16Module

    return [Float16Module(tconfig, chunk) for chunk in chunks]


def wrap_ddp(chunks, tconfig, cfg: TrainConfig):
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.overlap_grad_reduce,
        overlap_param_gather=cfg.overlap_param_gather,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=None,
    )
    return [
        # Only the first chunk's grads may be bucketed for overlap (Megatron-LM does the same).
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]


def optimizer_config(cfg: TrainConfig) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=cfg.model_options.bf16, params_dtype=cfg.model_options.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        overlap_param_gather=cfg.overlap_param_gather,
    )


def build_optimizer(model, cfg: TrainConfig):
    return get_megatron_optimizer(optimizer_config(cfg), model)


def build_scheduler(optimizer, cfg: TrainConfig) -> OptimizerParamScheduler:
    # Megatron counts scheduler steps in samples: one optimizer step = one global batch.
    gbs = cfg.global_batch_size
    decay_iters = max(1, cfg.lr_decay_iters or cfg.train_iters)  # --train-iters 0 saves the initial model
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.lr_warmup_iters else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters * gbs,
        lr_decay_steps=decay_iters * gbs,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay_iters * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=(decay_iters * gbs) // 5 if cfg.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if cfg.lr_decay_style == "WSD" else None,
    )
