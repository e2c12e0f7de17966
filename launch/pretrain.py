"""Entry point: `torchrun --nproc_per_node N launch/pretrain.py [Megatron-LM flags]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel.runtime import world_size_from_env  # noqa: E402
from pretrain.config.arguments import parse_args  # noqa: E402
from pretrain.trainer import pretrain  # noqa: E402


def main(argv=None) -> None:
    config = parse_args(argv, world_size=world_size_from_env())
    pretrain(config)


if __name__ == "__main__":
    main()
