"""Impossible layouts are refused before any allocation, naming the flag and the numbers."""

import re

import pytest
import torch

from model import transformer_impl
from model.presets import get_preset
from parallel.dims import LayoutError, ParallelDims
from pretrain.config.arguments import parse_args
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
    (ParallelDims(world_size=2, pp=2, layers_per_virtual_stage=0), 64, 8,
     "--num-layers-per-virtual-pipeline-stage 0 must be >= 1"),
    # megatron-core's interleaved schedule: micro-batches in groups of G (default PP), a last group >= PP
    (ParallelDims(world_size=2, pp=2, layers_per_virtual_stage=1), 64, 3,
     "the number of micro-batches 3 .* divisible by --pipeline-model-parallel-size 2"),
    (ParallelDims(world_size=2, pp=2, layers_per_virtual_stage=1, microbatch_group_size=3), 64, 3, None),
    (ParallelDims(world_size=2, pp=2, layers_per_virtual_stage=1, microbatch_group_size=4), 64, 3,
     "--microbatch-group-size-per-virtual-pipeline-stage 4 must be between"),
])
def test_layout_errors_name_the_flag(dims, seq, gbs, message):
    if message is None:
        dims.validate(TINY, seq, 1, gbs)
        return
    with pytest.raises(LayoutError, match=message.replace("(", r"\(")):
        dims.validate(TINY, seq, 1, gbs)


@pytest.mark.parametrize("flags, message", [
    # GLM-5 itself (78 layers, 64 heads, 256 experts) at full-scale worlds
    (["--pipeline-model-parallel-size", "12"], "num_hidden_layers 78 is not divisible by --pipeline-model-parallel-size 12"),
    (["--expert-model-parallel-size", "96"], "n_routed_experts 256 is not divisible by --expert-model-parallel-size 96"),
    (["--tensor-model-parallel-size", "3", "--sequence-parallel"],
     "num_attention_heads 64 is not divisible by --tensor-model-parallel-size 3"),
    (["--pipeline-model-parallel-size", "13", "--num-layers-per-virtual-pipeline-stage", "4"],
     "layers per pipeline stage 6 .* not divisible by --num-layers-per-virtual-pipeline-stage 4"),
    # Megatron-Bridge's GLM-5.2 layout without its micro-batch group: 32 micro-batches, PP 13
    (["--pipeline-model-parallel-size", "13", "--num-layers-per-virtual-pipeline-stage", "3",
      "--expert-model-parallel-size", "32", "--global-batch-size", "1024"],
     "the number of micro-batches 32 .* divisible by --pipeline-model-parallel-size 13"),
])
def test_full_scale_glm5_layouts_refused_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit):
        world = 416 if "13" in flags else 576  # PP 13: Megatron-Bridge's 416 GPUs; else the recipe's 576
        parse_args(["--preset", "glm5", "--mock-data", *flags], world_size=world)
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("flags, message", [
    (["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Et|t||tmL"],
     "--pipeline-model-parallel-layout 'Et|t||tmL' .* Number of decoder layers 3"),
    (["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Et|tt|tmL"],
     "must be divisible by pipeline_model_parallel_size"),
    (["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Et|t|ttm|L"],
     "put the MTP layer .* in the last pipeline stage"),
    (["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Ett|t||tmL",
      "--num-layers-per-virtual-pipeline-stage", "1"], "drop --num-layers-per-virtual-pipeline-stage"),
    (["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Ett|t||tmL",
      "--global-batch-size", "3"], "the number of micro-batches 3"),
    # Megatron-LM's --hybrid-layer-pattern, checked against the config (model/layer_pattern.py)
    (["--hybrid-layer-pattern", "D-DEDEDE/DE/DE/DE"], "3 MTP depth|1 MTP depth"),  # 3 built, 1 trained
    (["--hybrid-layer-pattern", "DEDEDEDE/DE"], "1 dense first"),
    # a '|' between a GLM layer's attention and its MoE is a stage boundary like any: a shared layer's attention
    # (3) must stay with its full layer's (2), wherever the MoE halves go (tiny-shared)
    (["--pipeline-model-parallel-size", "2", "--hybrid-layer-pattern", "D-DED|EDE/DE"],
     r"--hybrid-layer-pattern 'D-DED\|EDE/DE' puts layer 3 in another pipeline stage than layer 2"),
    (["--pipeline-model-parallel-size", "2", "--hybrid-layer-pattern", "D-DEDEDE/DE"],
     "1 pipeline segment.* --pipeline-model-parallel-size 2"),
    (["--pipeline-model-parallel-size", "2", "--hybrid-layer-pattern", "D-DE|DEDE/DE",
      "--pipeline-model-parallel-layout", "Ett|ttmL"], "drop --pipeline-model-parallel-layout"),
    (["--pipeline-model-parallel-size", "2", "--hybrid-layer-pattern", "D-|DE|DE|DE/DE"],
     r"--hybrid-layer-pattern 'D-\|DE\|DE\|DE/DE' puts layer 1 in another pipeline stage than layer 0"),  # tiny-shared
    (["--cp-comm-type", "p2p"], "--cp-comm-type p2p: DSA's context parallelism all-gathers"),
    (["--train-iters", "4", "--lr-warmup-iters", "4"], "--lr-warmup-iters 4 must be below the decay iterations 4"),
    (["--moe-flex-dispatcher-backend", "hybridep"], "needs --moe-token-dispatcher-type flex"),
    (["--moe-token-dispatcher-type", "allgather", "--moe-shared-expert-overlap"],
     "--moe-shared-expert-overlap works with --moe-token-dispatcher-type alltoall or flex"),
    # bad input of issue 37's pass: each refused by name, never silently changed
    (["--seq-len", "64"], "unrecognized arguments: --seq-len 64"),  # no abbreviations, as Megatron-LM
    (["--seq-length", "0"], "--seq-length 0 must be positive"),
    (["--train-iters", "0"], "--train-iters 0 must be at least 1"),
    (["--optimizer", "muon", "--overlap-param-gather"], "--overlap-param-gather .* add --use-distributed-optimizer"),
    (["--tokenizer", "/nonexistent/tok"], "--tokenizer /nonexistent/tok is not a directory"),
    (["--load", "ck", "--ckpt-step", "-1"], "--ckpt-step -1 must be an iteration number"),
    (["--ckpt-step", "3"], "--ckpt-step 3 changes what --load takes"),
])
def test_megatron_core_019_flags_refused_naming_the_flag(flags, message, capsys):
    preset = "tiny-shared" if "in another pipeline stage" in message else "tiny"
    with pytest.raises(SystemExit):
        parse_args(["--preset", preset, "--mock-data", *flags], world_size=2)
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusals of GPU-only options")
def test_gpu_only_moe_options_refused_on_cpu(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--preset", "tiny", "--mock-data", "--moe-token-dispatcher-type", "flex",
                    "--expert-model-parallel-size", "2"], world_size=2)
    assert "--moe-token-dispatcher-type flex (deepep) needs CUDA GPUs" in capsys.readouterr().err
    if not transformer_impl.te_available():
        with pytest.raises(SystemExit):
            parse_args(["--preset", "tiny", "--mock-data", "--moe-permute-fusion"], world_size=1)
        assert "--moe-permute-fusion uses Transformer Engine's fused permutation" in capsys.readouterr().err


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


@pytest.mark.integration
def test_torchrun_with_impossible_layout_fails_fast_and_says_so_once(tmp_path):
    """Every rank finds the flag error; rank 1 first here: it must not exit before rank 0 has said it
    (torchrun ends rank 0 as soon as rank 1 exits). Rank 0 is made slower by a wrapper that sleeps
    before the entry point runs."""
    from tests.helpers import ROOT

    slow = tmp_path / "slow_rank0.py"
    slow.write_text("import os, runpy, sys, time\n"
                    "if os.environ['RANK'] == '0':\n    time.sleep(2)\n"
                    f"sys.argv[0] = {str(ROOT / 'launch' / 'pretrain.py')!r}\n"
                    "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    proc = torchrun(2, ["--preset", "tiny", "--mock-data", "--tensor-model-parallel-size", "3"], timeout=120,
                    check=False, script=str(slow), warm=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "world size 2 is not divisible by --tensor-model-parallel-size 3" in errors[0]
