"""`python -m torch.distributed.run` (torchrun: its argument parser, LaunchConfig and elastic agent) with the workers
forked from this process once it has imported the trainer, instead of each started as a new interpreter that imports
torch and megatron-core again (seconds of CPU per rank). For the tests' multi-rank runs whose subject is the
training, not the launch: what a launch does (signals, a rank's death, start-up errors) is tested with the real
torchrun command."""

from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script, sys.path[0] is tests/, whose folders would shadow the packages they mirror
    sys.path[0] = str(ROOT)


def _worker(script: str, argv: list[str]) -> None:
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # as an interpreter's exit would (a forked worker ends with os._exit)


def main(argv: list[str]) -> None:
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    import launch.pretrain  # noqa: F401  what every worker imports, once
    import tests.grad_check  # noqa: F401

    args = parse_args(argv)
    config, _, _ = config_from_args(args)
    config.start_method = "fork"
    elastic_launch(config, _worker)(args.training_script, args.training_script_args)


if __name__ == "__main__":
    main(sys.argv[1:])
