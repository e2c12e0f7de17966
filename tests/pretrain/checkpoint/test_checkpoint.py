"""Checkpoints: Megatron's layout, exact resume, resharding across layouts, partial checkpoints
ignored, bad loads refused."""

import json
import shutil

import pytest

from pretrain.checkpoint.checkpointer import TRACKER, CheckpointError, latest_iteration
from tests.conftest import TINY_RUN
from tests.helpers import read_scalars, torchrun
from tests.inprocess import refused, train_here, trainer

pytestmark = pytest.mark.integration  # every test here runs torchrun or trains end to end


@pytest.fixture(scope="module")
def saved_at_3(tmp_path_factory):
    # --async-save: written by megatron-core's background writer, published (renamed, pointer
    # moved) when it finishes; the sync path is what every other checkpoint test uses.
    ck = tmp_path_factory.mktemp("saved") / "ck"
    proc = torchrun(1, [*TINY_RUN, "--save", str(ck), "--save-interval", "2", "--exit-interval", "3", "--async-save"])
    assert proc.stdout.count("saved checkpoint") == 2
    return ck


def test_checkpoint_layout_is_megatrons(saved_at_3):
    ck = saved_at_3
    assert (ck / TRACKER).read_text().strip() == "3"
    assert sorted(p.name for p in ck.iterdir()) == ["iter_0000002", "iter_0000003", TRACKER]
    state = json.loads((ck / "iter_0000003" / "run_state.json").read_text())
    assert state["iteration"] == 3 and state["consumed_tokens"] == 3 * 8 * 64
    assert state["model_config"]["model_type"] == "glm_moe_dsa"
    assert (ck / "iter_0000003" / "metadata.json").exists()  # dist_checkpointing's own


def test_exact_resume_ignoring_a_partial_checkpoint(saved_at_3, tmp_path, tiny_reference):
    ck = tmp_path / "ck"
    shutil.copytree(saved_at_3, ck)
    # A crash while writing iteration 4 left only its .partial directory behind.
    shutil.copytree(ck / "iter_0000003", ck / "iter_0000004.partial")
    (ck / "iter_0000004.partial" / "run_state.json").unlink()
    assert latest_iteration(ck) == 3
    resumed, full = train_here([*TINY_RUN, "--load", str(ck)])["lm loss"], tiny_reference["lm loss"]
    assert sorted(resumed) == list(range(4, 9))
    for it in resumed:
        assert resumed[it] == pytest.approx(full[it], rel=1e-6, abs=1e-6), it


@pytest.mark.parametrize("nproc, layout", [
    # interleaved PP=2 saves two model chunks per rank (model0, model1); TP2 x PP2 works the same way. Each '|'
    # cuts a GLM layer between its attention and its MLP/MoE: its halves' keys are saved by two stages
    (2, ["--pipeline-model-parallel-size", "2", "--hybrid-layer-pattern", "D-D|ED|ED|E/DE"]),
    (2, ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"]),
], ids=["pp2-vpp2-to-1", "ep2-distopt-to-1"])
def test_reshard_to_one_process(tmp_path, tiny_reference, nproc, layout):
    ck = tmp_path / "ck"
    torchrun(nproc, [*TINY_RUN, *layout, "--save", str(ck), "--exit-interval", "3"])
    resumed = train_here([*TINY_RUN, "--train-iters", "5", "--lr-decay-iters", "8", "--load", str(ck)])["lm loss"]
    for it in (4, 5):  # the same model continues: optimizer state and expert bias came along
        assert resumed[it] == pytest.approx(tiny_reference["lm loss"][it], rel=2e-3), it


def test_plain_optimizer_checkpoint_resumes_under_ep2_with_the_distributed_optimizer(saved_at_3, tmp_path,
                                                                                   tiny_reference):
    # fp32: the distributed optimizer's main parameters come from the saved weights, Adam moments and
    # step from the plain optimizer's state, at another layout.
    torchrun(2, [*TINY_RUN, "--train-iters", "5", "--lr-decay-iters", "8", "--load", str(saved_at_3),
                 "--expert-model-parallel-size", "2", "--use-distributed-optimizer",
                 "--tensorboard-dir", str(tmp_path / "tb")])
    resumed = read_scalars(tmp_path / "tb")
    for it in (4, 5):
        for tag in ("lm loss", "grad-norm"):
            assert resumed[tag][it] == pytest.approx(tiny_reference[tag][it], rel=1e-5), (tag, it)


def test_load_with_another_model_config_is_refused(saved_at_3, tmp_path):
    from model.presets import get_preset

    other = tmp_path / "other.json"
    get_preset("tiny").replace(moe_intermediate_size=48).save_hf_json(other)
    with refused(CheckpointError, "model config differs.*moe_intermediate_size"):
        with trainer(["--model-config", str(other), "--seq-length", "64", "--mock-data", "--train-iters", "4",
                      "--load", str(saved_at_3)]):
            pass


def test_bf16_trains_saves_and_resumes_exactly(tmp_path, tiny_reference):
    """bf16 params (megatron's Float16Module, norms included; fp32 main params in the optimizer): a
    run resumed from iteration 2 continues exactly as the uninterrupted bf16 run did."""
    ck, bf16_run = tmp_path / "ck", [*TINY_RUN, "--bf16", "--train-iters", "4", "--lr-decay-iters", "8"]
    full = train_here([*bf16_run, "--save", str(ck), "--save-interval", "2"])  # in this process: two launches less
    shutil.rmtree(ck / "iter_0000004")  # go back to the checkpoint of iteration 2
    (ck / TRACKER).write_text("2\n")
    resumed = train_here([*bf16_run, "--load", str(ck)])
    for tag in ("lm loss", "mtp loss", "grad-norm"):
        assert sorted(resumed[tag]) == [3, 4], tag
        for it in (3, 4):
            assert resumed[tag][it] == pytest.approx(full[tag][it], rel=1e-6, abs=1e-6), (tag, it)
    for it in range(1, 5):  # really bf16: off the fp32 run by bf16 rounding, no more
        assert full["lm loss"][it] != tiny_reference["lm loss"][it], it
        assert full["lm loss"][it] == pytest.approx(tiny_reference["lm loss"][it], rel=1e-2), it
