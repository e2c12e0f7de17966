"""The real Trainer inside the test process (one rank, gloo, CPU runtime): for checks of what it builds,
saves and loads, without the seconds a torchrun launch costs. Every Trainer made by `trainer()` is
torn down (megatron's groups, the batch-size calculator) when its `with` block ends."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.helpers import one_rank_gloo_world


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo world without megatron's groups (each Trainer makes and destroys its own)."""
    with one_rank_gloo_world():
        yield


@contextlib.contextmanager
def trainer(argv: list[str]):
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    from parallel.runtime import Runtime
    from pretrain.config.arguments import parse_args
    from pretrain.step import reset_loss_trackers
    from pretrain.trainer import Trainer

    cfg = parse_args(argv)
    torch.manual_seed(cfg.seed)
    made = None
    try:
        made = Trainer(cfg, Runtime(device=torch.device("cpu"), rank=0, world_size=1, local_rank=0))
        yield made
    finally:
        if made is not None:
            made.close()
        parallel_state.destroy_model_parallel()
        destroy_num_microbatches_calculator()
        reset_loss_trackers()  # a Trainer empties them when it starts too; not leaving them is tidier


def train_here(argv: list[str], prepare=None) -> dict:
    """Train in this process, in a one-rank gloo world of its own: {tag: {iteration: value}} read back
    from its TensorBoard event files, as tests.helpers.read_scalars gives a torchrun run's (for
    single-process runs whose test is not about the launch: each torchrun costs seconds of start-up)."""
    import tempfile

    from tests.helpers import one_rank_gloo_world, read_scalars

    with tempfile.TemporaryDirectory() as tb:
        with one_rank_gloo_world(), trainer([*argv, "--tensorboard-dir", tb]) as t:
            if prepare is not None:
                prepare(t)  # e.g. instrument the built Trainer
            t.train()
        return read_scalars(tb)


@contextlib.contextmanager
def refused(error: type[Exception], match: str):
    """A Trainer built from these arguments (in a one-rank world of its own) raises `error`."""
    from tests.helpers import one_rank_gloo_world

    with one_rank_gloo_world(), pytest.raises(error, match=match) as caught:
        yield caught
