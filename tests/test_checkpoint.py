"""Checkpoints: exact resume, resharding across layouts, atomic layout on disk, bad loads refused."""

import json
import shutil

import pytest

from pretrain.checkpointing import TRACKER, latest_iteration
from tests.helpers import read_scalars, torchrun

BASE = ["--preset", "tiny", "--mock-data", "--train-iters", "6", "--global-batch-size", "8", "--lr", "3e-3"]


def losses(tb, tag="lm loss"):
    return read_scalars(tb)[tag]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    torchrun(1, [*BASE, "--tensorboard-dir", str(d / "tb")])
    return losses(d / "tb")


def test_checkpoint_layout_is_megatrons(tmp_path):
    torchrun(1, [*BASE, "--train-iters", "4", "--save", str(tmp_path / "ck"), "--save-interval", "2"])
    ck = tmp_path / "ck"
    assert (ck / TRACKER).read_text().strip() == "4"
    assert sorted(p.name for p in ck.iterdir()) == ["iter_0000002", "iter_0000004", TRACKER]
    state = json.loads((ck / "iter_0000004" / "run_state.json").read_text())
    assert state["iteration"] == 4 and state["consumed_tokens"] == 4 * 8 * 64
    assert state["model_config"]["model_type"] == "glm_moe_dsa"
    assert (ck / "iter_0000004" / "metadata.json").exists()  # dist_checkpointing's own


def test_exact_resume(tmp_path, uninterrupted):
    ck, tb = tmp_path / "ck", tmp_path / "tb"
    torchrun(1, [*BASE, "--save", str(ck), "--exit-interval", "3", "--tensorboard-dir", str(tb / "a")])
    assert latest_iteration(ck) == 3
    torchrun(1, [*BASE, "--load", str(ck), "--save", str(ck), "--tensorboard-dir", str(tb / "b")])
    resumed = losses(tb / "b")
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):
        assert resumed[it] == pytest.approx(uninterrupted[it], rel=1e-6, abs=1e-6), it


@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", [
    (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2"]),
    (2, ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"]),
], ids=["tp2xpp2-to-1", "ep2-distopt-to-1"])
def test_reshard_to_one_process(tmp_path, uninterrupted, nproc, layout):
    ck = tmp_path / "ck"
    torchrun(nproc, [*BASE, *layout, "--save", str(ck), "--exit-interval", "3"])
    torchrun(1, [*BASE, "--load", str(ck), "--tensorboard-dir", str(tmp_path / "tb")])
    resumed = losses(tmp_path / "tb")
    for it in (4, 5, 6):  # the same model continues: optimizer state and expert bias came along
        assert resumed[it] == pytest.approx(uninterrupted[it], rel=2e-3), it


def test_partial_checkpoint_is_never_loaded(tmp_path):
    ck = tmp_path / "ck"
    torchrun(1, [*BASE, "--train-iters", "2", "--save", str(ck)])
    # A crash while writing iteration 3 leaves only its .partial directory behind.
    shutil.copytree(ck / "iter_0000002", ck / "iter_0000003.partial")
    (ck / "iter_0000003.partial" / "run_state.json").unlink()
    assert latest_iteration(ck) == 2
    proc = torchrun(1, [*BASE, "--train-iters", "3", "--load", str(ck)])
    assert "loaded checkpoint" in proc.stdout and "at iteration 2" in proc.stdout


def test_load_with_another_model_config_is_refused(tmp_path):
    ck = tmp_path / "ck"
    torchrun(1, [*BASE, "--train-iters", "1", "--save", str(ck)])
    other = tmp_path / "other.json"
    from model.presets import get_preset

    get_preset("tiny").replace(moe_intermediate_size=48).save_hf_json(other)
    proc = torchrun(1, ["--model-config", str(other), "--seq-length", "64", "--mock-data", "--train-iters", "2",
                        "--load", str(ck)], check=False)
    assert proc.returncode != 0 and "model config differs" in proc.stderr and "moe_intermediate_size" in proc.stderr
