"""Training stages from a checkpoint (pretrain/checkpoint/stages.py): Megatron-LM's --finetune, --no-load-optim and
--no-load-rng, a new data configuration starting its data position fresh, and a chain of three stages as
GLM-5 ran them (short context -> longer context -> DSA sparse), each continuing where the last one ended."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_RUN
from tests.inprocess import train_here


def _text(manifest, tokenizer, *extra) -> list[str]:
    return ["--preset", "tiny", "--data-path", str(manifest), "--tokenizer", tokenizer, "--global-batch-size", "8",
            "--micro-batch-size", "4", "--seed", "1234", "--lr", "1e-2", "--lr-warmup-iters", "2", *extra]


@pytest.mark.parametrize("argv, message", [
    (["--finetune"], "--finetune changes what --load takes from a checkpoint: give --load DIR"),
    (["--no-load-optim"], "--no-load-optim changes what --load takes"),
    (["--no-load-rng"], "--no-load-rng changes what --load takes"),
    (["--load", "x", "--no-load-optim", "--use-checkpoint-opt_param-scheduler"],
     "--no-load-optim does not load the checkpoint's LR schedule"),
    (["--load", "x", "--finetune", "--use-checkpoint-opt_param-scheduler"], "--finetune does not load"),
])
def test_stage_flags_are_refused_by_name_before_any_work(argv, message):
    from pretrain.config.arguments import build_parser, config_from_args

    with pytest.raises(ValueError, match=message):
        config_from_args(build_parser().parse_args([*TINY_RUN, *argv]), 1)


@pytest.mark.integration
def test_finetune_and_no_load_optim(tmp_path, capsys):
    """--finetune: the weights, at iteration 0; --no-load-optim: weights, iteration and data position, with a
    fresh optimizer and LR schedule -- another optimizer too, which a full resume refuses."""
    ck = tmp_path / "ck"
    fresh = train_here([*TINY_RUN, "--train-iters", "4"])["lm loss"]
    trained = train_here([*TINY_RUN, "--train-iters", "4", "--save", str(ck)])["lm loss"]

    tuned = train_here([*TINY_RUN, "--train-iters", "3", "--load", str(ck), "--finetune"])
    assert sorted(tuned["lm loss"]) == [1, 2, 3]
    assert tuned["lm loss"][1] < fresh[1] - 0.2  # the trained weights, on the first batch again
    assert "--finetune: weights only" in capsys.readouterr().out

    switched = train_here([*TINY_RUN, "--train-iters", "6", "--load", str(ck), "--no-load-optim",
                           "--optimizer", "muon"])
    assert sorted(switched["lm loss"]) == [5, 6]
    assert switched["lm loss"][5] < trained[4] + 0.2
    assert switched["learning-rate"][5] == pytest.approx(1.5e-3)  # the schedule's first warm-up step again
    assert "fresh: the optimizer state and LR schedule (--no-load-optim)" in capsys.readouterr().out


@pytest.mark.integration
def test_a_new_data_configuration_starts_its_data_position_fresh(text_shards, tmp_path, capsys):
    """The old blend's position is never applied to a new one: with another blend (or sequence length) the first
    batch after the load is that data's first batch -- the one a --finetune run of the same weights reads."""
    manifest, tokenizer = text_shards
    ck = tmp_path / "ck"
    train_here(_text(manifest, tokenizer, "--train-iters", "3", "--save", str(ck)))
    blend = ["--data-path", "0.5", str(manifest), "0.5", str(manifest)]  # another blend of the same shards
    moved = train_here([*_text(manifest, tokenizer, "--train-iters", "4", "--load", str(ck),
                               "--override-opt_param-scheduler"), *blend])["lm loss"]
    assert "the data position starts fresh: the data blend (--data-path) changed" in capsys.readouterr().out
    first = train_here([*_text(manifest, tokenizer, "--train-iters", "3", "--load", str(ck), "--finetune"),
                        *blend])["lm loss"]
    assert moved[4] == first[1]  # same weights, same (first) batch

    train_here(_text(manifest, tokenizer, "--train-iters", "4", "--load", str(ck), "--seq-length", "128",
                     "--override-opt_param-scheduler"))
    assert "--seq-length 64 -> 128" in capsys.readouterr().out


@pytest.fixture(scope="module")
def short_documents(text_shards, data_stdlib_files, tmp_path_factory) -> str:
    """The same stdlib text cut at blank lines into short documents (tens of tokens: several per sequence),
    tokenized with the same tokenizer: a manifest of packed documents."""
    _, tokenizer = text_shards
    work = tmp_path_factory.mktemp("short_docs")
    with open(work / "docs.jsonl", "w") as f:
        for path in data_stdlib_files[:40]:
            for part in path.read_text(errors="replace").split("\n\n"):
                if part.strip():
                    f.write(json.dumps({"text": part + "\n\n"}) + "\n")
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(work / "docs.jsonl"), "--tokenizer",
                    tokenizer, "--output-dir", str(work / "shards"), "--shard-size", "256KiB", "--chunk-tokens",
                    "8192", "--quiet"], cwd=REPO, check=True)
    return str(work / "shards" / "manifest.json")


@pytest.mark.integration
def test_three_stages_each_continue_where_the_last_ended(text_shards, short_documents, tmp_path, capsys):
    """GLM-5's order on the tiny model and real text: short context (every key attended), then a longer context
    of packed short documents with per-document attention and positions and a fresh optimizer and schedule,
    then DSA on them (the indexer's dense warm-up, then sparse attention inside each document); each stage's
    first loss is near the previous stage's last, far below a fresh model's."""
    manifest, tokenizer = text_shards
    one, two = tmp_path / "short", tmp_path / "long"
    documents = ["--data-path", short_documents, "--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]
    short = train_here(_text(manifest, tokenizer, "--seq-length", "64", "--dsa-indexer-topk", "64",
                             "--train-iters", "10", "--save", str(one)))["lm loss"]
    long = train_here([*_text(manifest, tokenizer, "--seq-length", "128", "--dsa-indexer-topk", "128",
                              "--train-iters", "16", "--load", str(one), "--no-load-optim", "--save", str(two)),
                       *documents])
    assert "the data blend (--data-path) changed" in capsys.readouterr().out
    sparse = train_here([*_text(manifest, tokenizer, "--seq-length", "128", "--dsa-indexer-topk", "16",
                                "--dsa-indexer-loss-coeff", "1.0", "--dsa-warmup-iters", "18", "--train-iters", "22",
                                "--load", str(two), "--no-load-optim"), *documents])
    long_lm, sparse_lm = long["lm loss"], sparse["lm loss"]
    assert sorted(long_lm)[0] == 11 and sorted(sparse_lm)[0] == 17
    assert [sparse["dsa/stage"][i] for i in (17, 18, 19, 22)] == [0.0, 0.0, 1.0, 1.0]  # warm-up, then sparse
    for name, last, first in (("longer context", short[10], long_lm[11]), ("DSA", long_lm[16], sparse_lm[17])):
        assert first < last + 0.4, f"{name}: first loss {first} after {last}"
        assert first < short[1] - 0.6, f"{name}: first loss {first}, a fresh model's {short[1]}"


def test_a_checkpoint_with_the_earlier_vocab_padding_loads(tmp_path, monkeypatch):
    """Before --make-vocab-size-divisible-by reached the model, its embedding and output layer were padded to
    128 x TP whatever the flag said (--vocab-size 1050 --make-vocab-size-divisible-by 64: a 1088-token config in
    1152 rows). Such a checkpoint loads into today's 1088 rows: megatron-core saves both tensors with
    allow_shape_mismatch, so the config's rows load and the padding rows are dropped (the default, 128, pads
    as before: tests/model/test_model_config.py)."""
    import torch

    from model import mcore_config
    from tests.helpers import one_rank_gloo_world
    from tests.inprocess import trainer

    run = [*TINY_RUN, "--train-iters", "1", "--lr-warmup-iters", "0", "--vocab-size", "1050",
           "--make-vocab-size-divisible-by", "64"]
    earlier = mcore_config.padded_vocab_size

    def weights(t) -> dict:
        chunk = t.model[0].module
        return {"embedding": chunk.embedding.word_embeddings.weight.detach().clone(),
                "output": chunk.output_layer.weight.detach().clone()}

    with monkeypatch.context() as m:
        m.setattr(mcore_config, "padded_vocab_size", lambda v, divisible_by, tp: earlier(v, divisible_by=128, tp=tp))
        with one_rank_gloo_world(), trainer([*run, "--save", str(tmp_path)]) as t:
            t.train()
            saved = weights(t)
    with one_rank_gloo_world(), trainer([*run, "--load", str(tmp_path)]) as t:
        assert t.iteration == 1
        loaded = weights(t)
    for name, rows in saved.items():
        assert rows.shape[0] == 1152 and loaded[name].shape[0] == 1088
        torch.testing.assert_close(loaded[name], rows[:1088], rtol=0, atol=0)
