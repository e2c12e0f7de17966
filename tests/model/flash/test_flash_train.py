"""GLM-5.3-Flash trains: `--preset glm5.3-flash-tiny` through the real Trainer (in this process: tests/inprocess.py)
on real token shards, with falling loss, the MoE statistics of its mHC-wrapped MoE layers logged, and a checkpoint
that resumes: the run continued from it equals the uninterrupted one step for step."""

from __future__ import annotations

import pytest

from tests.inprocess import train_here


def _run(manifest, tokenizer, iters, *extra):
    return ["--preset", "glm5.3-flash-tiny", "--data-path", str(manifest), "--tokenizer", tokenizer,
            "--vocab-size", "500", "--seq-length", "64", "--train-iters", str(iters), "--global-batch-size", "8",
            "--micro-batch-size", "4", "--lr", "1e-2", "--lr-warmup-iters", "2", "--seed", "1", *extra]


def test_flash_trains_on_real_text_and_resumes(text_shards, tmp_path):
    manifest, tokenizer = text_shards
    ck = tmp_path / "ck"
    full = train_here(_run(manifest, tokenizer, 8, "--save", str(ck), "--save-interval", "4"))
    lm = full["lm loss"]
    assert lm[8] < lm[1] - 0.5, lm
    assert "moe/load-imbalance/layer-01" in full and "mtp loss" not in full
    # resumed from iteration 4: the same losses as the uninterrupted run (the checkpoint holds every weight)
    resumed = train_here(_run(manifest, tokenizer, 8, "--load", str(ck), "--ckpt-step", "4"))["lm loss"]
    assert sorted(resumed) == [5, 6, 7, 8]
    for i in resumed:
        assert resumed[i] == pytest.approx(lm[i], rel=1e-5), (i, resumed[i], lm[i])
