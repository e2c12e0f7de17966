"""Moving a checkpoint from one training stage to the next, with Megatron-LM's flags.

GLM-5 was trained in stages (short-context pre-training, long-context mid-training on packed documents, DSA
switched on over a dense warm-up): each stage starts from the previous stage's checkpoint with other
flags. What `--load` takes from the checkpoint:

  flags                what is loaded                            what starts fresh
  (none)               weights, optimizer, LR schedule, data     -
                       position, RNG, iteration
  --no-load-optim      weights, data position, RNG, iteration    the optimizer state and the LR/WD schedule
                                                                  (it counts from this run's first step)
  --no-load-rng        all but the RNG                           the RNG (reseeded from --seed)
  --finetune           the weights                               everything else: iteration 0

The data position belongs to one data configuration (the blend's datasets and weights, the sequence
length, the global batch size and the ramp, the seed: data/reader.py's state header). When this run's
differs, the position starts at the beginning of this run's data and the log says what changed: the
old blend's position is never applied to a new one.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    ckpt_step: int | None = None  # this iteration instead of the tracker's

    @classmethod
    def from_args(cls, args) -> "LoadOptions":
        return cls(finetune=args.finetune, no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng,
                   ckpt_step=args.ckpt_step)

    def describe(self) -> str | None:
        """The log line after loading, or None when the whole run state was loaded."""
        if self.finetune:
            return "--finetune: weights only; iteration 0, fresh optimizer, LR schedule, data position and RNG"
        fresh = [what for what, on in (("the optimizer state and LR schedule (--no-load-optim)", self.no_load_optim),
                                       ("the RNG (--no-load-rng)", self.no_load_rng)) if on]
        return "fresh: " + ", ".join(fresh) if fresh else None


def add_arguments(p) -> None:
    g = p.add_argument_group("loading a checkpoint, and stage changes")
    g.add_argument("--load", default=None)
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="with --load: stop if it holds no checkpoint instead of starting from random weights")
    g.add_argument("--finetune", action="store_true",
                   help="load the checkpoint's weights only: iteration 0, fresh optimizer, schedule, data and RNG")
    g.add_argument("--no-load-optim", action="store_true",
                   help="do not load the optimizer state and LR/WD schedule (the schedule restarts)")
    g.add_argument("--no-load-rng", action="store_true", help="do not load the RNG state")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="load this iteration of --load instead of the latest (e.g. the one before a damaged one)")


def _is_one_iteration(path: str) -> bool:
    """An `iter_N` directory (ours or Megatron-Bridge's) rather than the checkpoint root above it."""
    from pretrain.checkpoint import bridge_format
    from pretrain.checkpoint.run_state import RUN_STATE, TRACKER

    d = Path(path)
    return not (d / TRACKER).exists() and any((d / f).is_file() for f in (RUN_STATE, bridge_format.RUN_CONFIG,
                                                                          ".metadata"))


def check_arguments(args) -> None:
    """Before any work: --load names a checkpoint root, each flag needs --load, and none may contradict another."""
    from pretrain.checkpoint.run_state import TRACKER

    if args.load and _is_one_iteration(args.load):  # e.g. the path Bridge's load_megatron_model takes
        raise ValueError(f"--load {args.load} is one iteration of a checkpoint: give the directory above it "
                         "(the one holding latest_checkpointed_iteration.txt)")
    if args.exit_on_missing_checkpoint:
        if not args.load:
            raise ValueError("--exit-on-missing-checkpoint needs --load DIR")
        if not os.path.exists(os.path.join(args.load, TRACKER)):
            raise ValueError(f"--load {args.load} holds no checkpoint (no {TRACKER}) and --exit-on-missing-checkpoint "
                             "is set: check the path, or drop the flag to start from random weights")
    given = [flag for flag, on in (("--finetune", args.finetune), ("--no-load-optim", args.no_load_optim),
                                   ("--no-load-rng", args.no_load_rng),
                                   (f"--ckpt-step {args.ckpt_step}", args.ckpt_step is not None)) if on]
    if args.ckpt_step is not None and args.ckpt_step < 0:
        raise ValueError(f"--ckpt-step {args.ckpt_step} must be an iteration number (>= 0)")
    if given and not args.load:
        raise ValueError(f"{given[0]} changes what --load takes from a checkpoint: give --load DIR")
    if (args.finetune or args.no_load_optim) and args.use_checkpoint_opt_param_scheduler:
        flag = "--finetune" if args.finetune else "--no-load-optim"
        raise ValueError(f"{flag} does not load the checkpoint's LR schedule, which "
                         "--use-checkpoint-opt_param-scheduler asks for: drop one of them")
