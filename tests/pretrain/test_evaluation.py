"""Held-out evaluation (--eval-interval / --eval-iters / --valid-data-path), Megatron's document flags,
--vocab-size, --load without a checkpoint, and start-up errors as one line.

The validation loss at every parallel layout is checked by the equivalence suite (tests/grad_check.py
evaluates in its runs and compares `lm loss validation` and `mtp loss validation`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretrain.config.arguments import parse_args
from pretrain.step import split_microbatches
from tests.conftest import TINY_RUN
from tests.helpers import read_scalars, torchrun
from tests.inprocess import train_here

TRAINING_TAGS = ("lm loss", "mtp loss", "grad-norm", "learning-rate", "moe/load-imbalance", "moe/expert-bias-max",
                 "moe/dropped-tokens-fraction")


@pytest.mark.integration
def test_evaluation_changes_no_training_number(tiny_reference, tmp_path):
    proc = torchrun(1, [*TINY_RUN, "--eval-interval", "3", "--eval-iters", "2", "--log-validation-ppl-to-tensorboard",
                        "--tensorboard-dir", str(tmp_path)])
    got = read_scalars(tmp_path)
    for tag in TRAINING_TAGS:
        assert got[tag] == tiny_reference[tag], tag  # bit for bit: evaluation touches nothing training reads
    # every --eval-interval iterations and at the end, under Megatron-LM's tags
    for tag in ("lm loss validation", "lm loss validation ppl", "mtp loss validation"):
        assert sorted(got[tag]) == [3, 6, 8], tag
    for it, loss in got["lm loss validation"].items():
        assert got["lm loss validation ppl"][it] == pytest.approx(math.exp(loss), rel=1e-5)
    assert got["lm loss validation"][8] < got["lm loss validation"][3] - 0.1  # the held-out stream is learnable
    lines = [ln for ln in proc.stdout.splitlines() if "validation loss at iteration" in ln]
    assert len(lines) == 3 and "lm loss PPL:" in lines[-1] and "mtp loss value:" in lines[-1]


def test_eod_mask_loss_drops_the_positions_whose_input_is_eod():
    tokens = torch.tensor([[5, 0, 7, 8, 0, 9, 4, 3, 0]])  # EOD = 0
    plain = split_microbatches(tokens, 1, cp_size=1, cp_rank=0)[0]
    masked = split_microbatches(tokens, 1, cp_size=1, cp_rank=0, eod_id=0)[0]
    assert plain["loss_mask"].tolist() == [[1.0] * 8]
    assert masked["loss_mask"].tolist() == [[1, 0, 1, 1, 0, 1, 1, 1]]  # input EOD: the next document's 1st token
    # under context parallelism the mask is cut with the tokens
    cp = [split_microbatches(tokens, 1, cp_size=2, cp_rank=r, eod_id=0)[0] for r in range(2)]
    for part in cp:
        assert torch.equal(part["loss_mask"], (part["input_ids"] != 0).float())


@pytest.fixture
def shards(data_synthetic):
    path, _ = data_synthetic(num_docs=600, max_len=20)  # short documents: many EOD positions
    return path


SHARD_RUN = ["--preset", "tiny", "--vocab-size", "2000", "--train-iters", "2", "--global-batch-size", "8",
             "--lr", "0", "--min-lr", "0", "--moe-router-bias-update-rate", "0"]  # weights stay put


@pytest.mark.integration
def test_validation_on_shards_and_eod_mask_loss(shards, tmp_path, capsys):
    # The validation set is the training set: its first batch is training step 1's, on unchanged weights.
    # (In this process: the launch is another test's business.) A model run earlier in the process left
    # values in megatron-core's process-global MTP tracker: the Trainer starts from zero anyway.
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    MTPLossLoggingHelper.tracker["loss_values"] = torch.full((1,), 4.0)
    m = train_here([*SHARD_RUN, "--data-path", shards, "--valid-data-path", shards, "--eod-mask-loss",
                    "--eval-interval", "1", "--eval-iters", "1"])
    assert m["lm loss validation"][1] == m["lm loss validation"][2]  # the same batches every time
    assert m["lm loss validation"][1] == pytest.approx(m["lm loss"][1], rel=1e-6)  # forward-only = training's
    assert m["mtp loss validation"][1] == pytest.approx(m["mtp loss"][1], rel=1e-6)

    # Without --eod-mask-loss the same batch has another loss; --load of an empty path is said, not silent.
    capsys.readouterr()
    p = train_here([*SHARD_RUN, "--data-path", shards, "--load", str(tmp_path / "typo")])
    assert f"--load {tmp_path / 'typo'} holds no checkpoint" in capsys.readouterr().out
    assert abs(p["lm loss"][1] - m["lm loss"][1]) > 1e-5 * p["lm loss"][1]


@pytest.mark.integration
def test_startup_error_is_one_line_naming_the_fix(shards):
    proc = torchrun(2, ["--preset", "tiny", "--data-path", shards, "--train-iters", "1"], check=False, warm=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]  # rank 0 only
    assert "token id" in errors[0] and "add --vocab-size 1048576" in errors[0]
    assert "pretrain.py\", line" not in proc.stderr  # no traceback of ours


def _args(*extra):
    return ["--preset", "tiny", "--train-iters", "2", "--global-batch-size", "8", *extra]


def _refused(capsys, argv, *words):
    with pytest.raises(SystemExit):
        parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)


def test_validation_set_mismatches_are_refused(data_synthetic, tmp_path, capsys):
    from data.writer import ShardWriter

    train, _ = data_synthetic("train")
    other_tok, _ = data_synthetic("other", tokenizer_sha="1" * 64)
    _refused(capsys, _args("--data-path", train, "--valid-data-path", other_tok, "--eval-interval", "1"),
             "--valid-data-path", "tokenizer", "other")
    with ShardWriter(str(tmp_path / "u16"), tokenizer={"name": "synthetic", "sha256": "0" * 64, "vocab_size": 1 << 20},
                     eod_id=0, dtype="uint16") as w:
        for _ in range(50):
            w.add_document(np.arange(1, 100))
    _refused(capsys, _args("--data-path", train, "--valid-data-path", str(tmp_path / "u16" / "manifest.json"),
                           "--eval-interval", "1"), "token dtype 'uint16'", "'uint32'")
    _refused(capsys, _args("--data-path", train, "--valid-data-path", train, "--eval-interval", "1",
                           "--eval-iters", "1000"), "--eval-iters 1000", "global batch(es)")
    _refused(capsys, _args("--data-path", train, "--eval-interval", "1"), "--valid-data-path")


@pytest.mark.parametrize("flag", ["--reset-position-ids", "--reset-attention-mask"])
def test_document_flags_megatron_cores_dsa_cannot_honour_are_refused(flag, capsys):
    # ours (blockwise, triton) honour them: tests/data/test_packed_documents.py
    _refused(capsys, _args("--mock-data", flag, "--dsa-kernel-backend", "none"), flag, "--dsa-kernel-backend none")


def test_vocab_size_is_padded_as_megatron(tmp_path, capsys):
    assert parse_args(_args("--mock-data", "--vocab-size", "2000")).model.vocab_size == 2048
    cfg = parse_args(_args("--mock-data", "--vocab-size", "2100", "--tensor-model-parallel-size", "2",
                           "--sequence-parallel"), world_size=2)
    assert cfg.model.vocab_size == 2304  # a multiple of 128 x TP
    _refused(capsys, _args("--mock-data", "--load", str(tmp_path), "--exit-on-missing-checkpoint"),
             f"--load {tmp_path} holds no checkpoint")
