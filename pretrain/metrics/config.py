"""What a run reports besides its losses (docs/OBSERVABILITY.md): timers, memory, norms, the profiler,
Weights & Biases and the expert-load picture. Megatron-LM's flag names; each combination that cannot
work is refused here, by name, before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

# Megatron-LM's defaults for --profile-step-start / --profile-step-end / --profile-ranks
PROFILE_DEFAULTS = (10, 12, (0,))


@dataclasses.dataclass(frozen=True)
class ObservabilityConfig:
    timing_log_level: int = 0  # 0: no synchronisation on the hot path; 1: phases; 2: + compute and p2p
    timing_log_option: str = "minmax"  # max | minmax | all (over ranks)
    log_timers_to_tensorboard: bool = False
    barrier_with_l1_time: bool = True  # megatron-core's barrier_with_L1_time
    log_memory_to_tensorboard: bool = False
    log_params_norm: bool = False
    log_num_zeros_in_grad: bool = False
    log_throughput: bool = False
    log_validation_ppl_to_tensorboard: bool = False
    profile: bool = False
    profile_step_start: int = PROFILE_DEFAULTS[0]  # profiled: iterations start+1 .. end
    profile_step_end: int = PROFILE_DEFAULTS[1]
    profile_ranks: tuple[int, ...] = PROFILE_DEFAULTS[2]
    use_pytorch_profiler: bool = False
    profiler_collect_shapes: bool = False
    profiler_collect_callstack: bool = False
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None
    wandb_entity: str | None = None
    moe_load_heatmap_interval: int = 0  # in log intervals; 0: off


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("timers, memory and norms (docs/OBSERVABILITY.md)")
    g.add_argument("--timing-log-level", type=int, choices=[0, 1, 2], default=0,
                   help="0: iteration time and checkpoint saves only (no synchronisation per step); 1: + "
                        "forward-backward, gradient sync, parameter all-gather, optimizer phases; 2: + "
                        "forward/backward compute, pipeline send/recv, batch generation")
    g.add_argument("--timing-log-option", choices=["max", "minmax", "all"], default="minmax",
                   help="timer values over ranks in the log: the max, min and max, or every rank's")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="write '<timer>-time' (max over ranks, seconds per iteration) and 'iteration-time'")
    g.add_argument("--no-barrier-with-level-1-timing", dest="barrier_with_L1_time", action="store_false",
                   help="no barrier before level-1 timers start (their times then include waiting for others)")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="CUDA: allocated/reserved/peak bytes (Megatron-LM's mem-* tags); CPU: the process's "
                        "resident memory; both: the highest peak over ranks and its rank")
    g.add_argument("--log-params-norm", action="store_true", help="the global L2 norm of the weights")
    g.add_argument("--log-num-zeros-in-grad", action="store_true",
                   help="zero gradient values over the whole model (megatron-core's optimizer counts them)")
    g.add_argument("--log-throughput", action="store_true",
                   help="model TFLOP/s per GPU in the log line and as 'throughput'")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="also write 'lm loss validation ppl' (the log line always shows it)")
    g.add_argument("--moe-load-heatmap-interval", type=int, default=0,
                   help="every N log intervals, an image of tokens per expert / mean per MoE layer "
                        "(layers x experts) under 'moe/expert-load' (0: off)")

    g = parser.add_argument_group("profiling")
    g.add_argument("--profile", action="store_true",
                   help="profile iterations --profile-step-start+1 .. --profile-step-end on --profile-ranks: "
                        "CUDA profiler ranges for nsys (--capture-range=cudaProfilerApi), or with "
                        "--use-pytorch-profiler a torch.profiler trace under --tensorboard-dir/profile")
    g.add_argument("--profile-step-start", type=int, default=None,
                   help=f"profile after this many iterations (default {PROFILE_DEFAULTS[0]})")
    g.add_argument("--profile-step-end", type=int, default=None,
                   help=f"stop profiling after this iteration (default {PROFILE_DEFAULTS[1]})")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=None,
                   help="global ranks to profile (default 0)")
    g.add_argument("--use-pytorch-profiler", action="store_true", help="torch.profiler instead of nsys ranges")
    g.add_argument("--pytorch-profiler-collect-shapes", action="store_true", help="record operator input shapes")
    g.add_argument("--pytorch-profiler-collect-callstack", action="store_true",
                   help="record Python call stacks (large traces)")

    g = parser.add_argument_group("weights & biases (pip install -e .[wandb])")
    g.add_argument("--wandb-project", default=None, help="log the TensorBoard scalars to this W&B project too")
    g.add_argument("--wandb-exp-name", default=None, help="the W&B run's name")
    g.add_argument("--wandb-save-dir", default=None, help="where W&B writes (default: --save/wandb)")
    g.add_argument("--wandb-entity", default=None, help="the W&B team or user")


def from_args(args, world_size: int) -> ObservabilityConfig:
    """The options, or a ValueError naming the flag."""
    writes = bool(args.tensorboard_dir or args.wandb_project)
    for flag in ("--log-timers-to-tensorboard", "--log-memory-to-tensorboard", "--log-validation-ppl-to-tensorboard"):
        if _value(args, flag) and not writes:
            raise ValueError(f"{flag} writes to TensorBoard (or W&B): add --tensorboard-dir DIR or --wandb-project")
    if args.log_num_zeros_in_grad and args.dp_engine == "deepspeed":
        raise ValueError("--log-num-zeros-in-grad counts in megatron-core's optimizer: DeepSpeed ZeRO does not "
                         "count them (drop the flag, or use --dp-engine megatron)")
    if args.moe_load_heatmap_interval < 0:
        raise ValueError(f"--moe-load-heatmap-interval {args.moe_load_heatmap_interval} must be >= 0 (0: off)")
    if args.moe_load_heatmap_interval and not args.tensorboard_dir:
        raise ValueError("--moe-load-heatmap-interval draws into TensorBoard: add --tensorboard-dir DIR")
    profile = _profile(args, world_size)
    wandb_save_dir = _wandb(args)
    return ObservabilityConfig(
        timing_log_level=args.timing_log_level, timing_log_option=args.timing_log_option,
        log_timers_to_tensorboard=args.log_timers_to_tensorboard, barrier_with_l1_time=args.barrier_with_L1_time,
        log_memory_to_tensorboard=args.log_memory_to_tensorboard, log_params_norm=args.log_params_norm,
        log_num_zeros_in_grad=args.log_num_zeros_in_grad, log_throughput=args.log_throughput,
        log_validation_ppl_to_tensorboard=args.log_validation_ppl_to_tensorboard, **profile,
        wandb_project=args.wandb_project, wandb_exp_name=args.wandb_exp_name, wandb_save_dir=wandb_save_dir,
        wandb_entity=args.wandb_entity, moe_load_heatmap_interval=args.moe_load_heatmap_interval)


def _value(args, flag: str):
    return getattr(args, flag[2:].replace("-", "_"))


def _profile(args, world_size: int) -> dict:
    given = {"--profile-step-start": args.profile_step_start, "--profile-step-end": args.profile_step_end,
             "--profile-ranks": args.profile_ranks, "--use-pytorch-profiler": args.use_pytorch_profiler or None,
             "--pytorch-profiler-collect-shapes": args.pytorch_profiler_collect_shapes or None,
             "--pytorch-profiler-collect-callstack": args.pytorch_profiler_collect_callstack or None}
    if not args.profile:
        for flag, value in given.items():
            if value is not None:
                raise ValueError(f"{flag} needs --profile")
        return {}
    start = PROFILE_DEFAULTS[0] if args.profile_step_start is None else args.profile_step_start
    end = PROFILE_DEFAULTS[1] if args.profile_step_end is None else args.profile_step_end
    ranks = tuple(PROFILE_DEFAULTS[2] if args.profile_ranks is None else args.profile_ranks)
    if start < 0:
        raise ValueError(f"--profile-step-start {start} must be >= 0 (the iterations done before profiling)")
    if end <= start:
        raise ValueError(f"--profile-step-end {end} must be above --profile-step-start {start} "
                         "(iterations start+1 .. end are profiled)")
    if end > args.train_iters:
        raise ValueError(f"--profile-step-end {end} is beyond --train-iters {args.train_iters}: the profile "
                         "would never end (Megatron-LM's defaults are 10 and 12)")
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        raise ValueError(f"--profile-ranks {' '.join(map(str, bad))}: this run has ranks 0..{world_size - 1}")
    if args.use_pytorch_profiler and not args.tensorboard_dir:
        raise ValueError("--use-pytorch-profiler writes its trace under --tensorboard-dir: add --tensorboard-dir DIR")
    if not args.use_pytorch_profiler and not torch.cuda.is_available():
        raise ValueError("--profile without --use-pytorch-profiler marks CUDA profiler ranges for nsys: this "
                         "machine has no CUDA GPU; add --use-pytorch-profiler for a torch.profiler trace")
    return dict(profile=True, profile_step_start=start, profile_step_end=end, profile_ranks=ranks,
                use_pytorch_profiler=args.use_pytorch_profiler,
                profiler_collect_shapes=args.pytorch_profiler_collect_shapes,
                profiler_collect_callstack=args.pytorch_profiler_collect_callstack)


def _wandb(args) -> str | None:
    if not args.wandb_project:
        for flag in ("--wandb-exp-name", "--wandb-save-dir", "--wandb-entity"):
            if _value(args, flag):
                raise ValueError(f"{flag} needs --wandb-project")
        return None
    from pretrain.metrics.wandb_sink import require_wandb

    require_wandb()
    if args.wandb_save_dir:
        return args.wandb_save_dir
    if args.save:
        return os.path.join(args.save, "wandb")
    raise ValueError("--wandb-project needs a directory for the W&B run: --wandb-save-dir DIR (or --save DIR: "
                     "then DIR/wandb)")
