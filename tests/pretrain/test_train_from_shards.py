"""The tiny model trains from real tar shards of a real corpus, and resumes exactly from them."""

import shutil

import pytest

from tests.helpers import read_scalars, torchrun
from tests.inprocess import refused, train_here, trainer


@pytest.fixture(scope="module")
def shards(text_shards):
    return text_shards


def args(manifest, tokenizer, *extra):
    return ["--preset", "tiny", "--data-path", str(manifest), "--tokenizer", tokenizer, "--train-iters", "6",
            "--global-batch-size", "8", "--lr", "3e-3", *extra]


@pytest.mark.integration
def test_trains_and_resumes_exactly_from_shards(shards, tmp_path):
    manifest, tokenizer = shards
    ck = tmp_path / "ck"
    full = train_here(args(manifest, tokenizer, "--save", str(ck), "--save-interval", "3"))["lm loss"]
    assert full[6] < full[1] - 0.3  # it learns real text

    (ck / "latest_checkpointed_iteration.txt").write_text("3\n")  # back to iteration 3's checkpoint
    resumed = train_here(args(manifest, tokenizer, "--load", str(ck)))["lm loss"]
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):  # the reader continued mid-epoch at exactly the same batches
        assert resumed[it] == pytest.approx(full[it], rel=1e-6), it


def test_tokenizer_mismatch_is_refused(shards, data_tokenizer_dir):
    manifest, _ = shards
    with refused(ValueError, "tokenizer"), trainer(args(manifest, data_tokenizer_dir, "--train-iters", "1")):
        pass


@pytest.mark.integration
def test_batch_ramp_and_mtp_schedule_from_shards_resume_exactly(shards, tmp_path):
    # Megatron's ramp: +2 sequences every 12 / ((8 - 4) / 2) = 6 consumed samples, up to 8:
    # consumed 0 -> 4, 4 -> 4, 8 -> 6, 14 -> 8. The MTP weight drops after 1000 tokens (64 per sequence):
    # consumed tokens before steps 1..5 are 0, 256, 512, 896, 1408. The reader gives 2 streams' rows
    # (gcd of 4, 2, 8) per step, 1 to 4 rows each as the batch grows, split over 2 DP ranks.
    manifest, tokenizer = shards
    recipe = ["--rampup-batch-size", "4", "2", "12", "--train-iters", "5", "--mtp-loss-scaling-factor", "0.3,1000:0.1"]
    ck = tmp_path / "ck"
    torchrun(2, args(manifest, tokenizer, *recipe, "--save", str(ck), "--save-interval", "2",
                     "--tensorboard-dir", str(tmp_path / "full")))
    full = read_scalars(tmp_path / "full")
    assert [full["batch-size"][i] for i in range(1, 6)] == [4.0, 4.0, 6.0, 8.0, 8.0]
    assert [round(full["mtp-loss-scaling-factor"][i], 6) for i in range(1, 6)] == [0.3, 0.3, 0.3, 0.3, 0.1]

    resume = tmp_path / "resume"  # the checkpoint of iteration 2, as if the run had stopped there
    resume.mkdir()
    shutil.copytree(ck / "iter_0000002", resume / "iter_0000002")
    (resume / "latest_checkpointed_iteration.txt").write_text("2\n")
    torchrun(2, args(manifest, tokenizer, *recipe, "--load", str(resume), "--tensorboard-dir", str(tmp_path / "resumed")))
    resumed = read_scalars(tmp_path / "resumed")
    for it in (3, 4, 5):  # the same batch sizes, tokens, schedule and batches
        for tag in ("batch-size", "consumed-tokens", "mtp-loss-scaling-factor"):
            assert resumed[tag][it] == full[tag][it], (tag, it)
        assert resumed["lm loss"][it] == pytest.approx(full["lm loss"][it], rel=1e-6)
