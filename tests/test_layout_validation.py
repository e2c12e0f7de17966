"""Impossible layouts are refused before any allocation, naming the flag and the numbers."""

import pytest

from model.presets import get_preset
from parallel.dims import LayoutError, ParallelDims
from pretrain.arguments import parse_args
from tests.helpers import torchrun

TINY = get_preset("tiny")


@pytest.mark.parametrize("dims, seq, gbs, message", [
    (ParallelDims(world_size=2, tp=3), 64, 8, "world size 2 is not divisible by --tensor-model-parallel-size 3"),
    (ParallelDims(world_size=3, tp=3), 64, 9, "num_attention_heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (ParallelDims(world_size=3, ep=3), 64, 9, "n_routed_experts 8 is not divisible by --expert-model-parallel-size 3"),
    (ParallelDims(world_size=2, pp=2, layers_per_virtual_stage=3), 64, 8, "--num-layers-per-virtual-pipeline-stage 3"),
    (ParallelDims(world_size=3, pp=3), 64, 9, "num_hidden_layers 4 is not divisible by --pipeline-model-parallel-size 3"),
    (ParallelDims(world_size=2, tp=2, sequence_parallel=True), 63, 8, "--seq-length 63 is not divisible"),
    (ParallelDims(world_size=2), 64, 7, "--global-batch-size 7 is not divisible"),
    (ParallelDims(world_size=4, ep=4, tp=1), 64, 8, None),
    (ParallelDims(world_size=2, ep=4), 64, 8, "--expert-model-parallel-size 4"),
    (ParallelDims(world_size=2, cp=2), 64, 8, None),
    (ParallelDims(world_size=2, cp=2), 66, 8, "--seq-length 66 is not divisible by 2 x --context-parallel-size 2 = 4"),
    (ParallelDims(world_size=4, cp=2, tp=2, sequence_parallel=True), 64, 8, None),
    (ParallelDims(world_size=4, cp=2, tp=2, sequence_parallel=True), 36, 8,
     "--seq-length 36 is not divisible by 2 x --context-parallel-size 2 x --tensor-model-parallel-size 2"),
    (ParallelDims(world_size=4, cp=3), 60, 8, "world size 4 is not divisible"),
    (ParallelDims(world_size=1, sequence_parallel=True), 64, 8, "--sequence-parallel needs"),
])
def test_layout_errors_name_the_flag(dims, seq, gbs, message):
    if message is None:
        dims.validate(TINY, seq, 1, gbs)
        return
    with pytest.raises(LayoutError, match=message.replace("(", r"\(")):
        dims.validate(TINY, seq, 1, gbs)


def test_arguments_refuse_before_work(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--mock-data", "--tensor-model-parallel-size", "3"], world_size=2)
    assert "--tensor-model-parallel-size 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--mock-data", "--preset", "glm6"], world_size=1)
    assert "glm6" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([], world_size=1)  # neither --mock-data nor --data-path
    assert "--mock-data" in capsys.readouterr().err


def test_torchrun_with_impossible_layout_fails_fast():
    proc = torchrun(2, ["--preset", "tiny", "--mock-data", "--tensor-model-parallel-size", "3"], timeout=120,
                    check=False)
    assert proc.returncode != 0
    assert "world size 2 is not divisible by --tensor-model-parallel-size 3" in proc.stderr
