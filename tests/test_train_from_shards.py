"""The tiny model trains from real tar shards of a real corpus, and resumes exactly from them."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT, read_scalars, torchrun


@pytest.fixture(scope="module")
def shards(tmp_path_factory, data_stdlib_files):
    from data.tokenizer import train_bpe_tokenizer

    work = tmp_path_factory.mktemp("corpus")
    tokenizer = train_bpe_tokenizer(data_stdlib_files[:40], 500, str(work / "tokenizer"))  # fits tiny's 512
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", *map(str, data_stdlib_files[:40]),
                    "--tokenizer", tokenizer, "--output-dir", str(work / "shards"), "--shard-size", "256KiB",
                    "--chunk-tokens", "8192", "--quiet"], cwd=ROOT, check=True)
    return work / "shards" / "manifest.json", tokenizer


def args(manifest, tokenizer, *extra):
    return ["--preset", "tiny", "--data-path", str(manifest), "--tokenizer", tokenizer, "--train-iters", "6",
            "--global-batch-size", "8", "--lr", "3e-3", *extra]


def test_trains_and_resumes_exactly_from_shards(shards, tmp_path):
    manifest, tokenizer = shards
    torchrun(1, args(manifest, tokenizer, "--tensorboard-dir", str(tmp_path / "full")))
    full = read_scalars(tmp_path / "full")["lm loss"]
    assert full[6] < full[1] - 0.3  # it learns real text

    ck = tmp_path / "ck"
    torchrun(1, args(manifest, tokenizer, "--save", str(ck), "--exit-interval", "3"))
    torchrun(1, args(manifest, tokenizer, "--load", str(ck), "--tensorboard-dir", str(tmp_path / "resumed")))
    resumed = read_scalars(tmp_path / "resumed")["lm loss"]
    for it in (4, 5, 6):  # the reader continued mid-epoch at exactly the same batches
        assert resumed[it] == pytest.approx(full[it], rel=1e-6), it


def test_tokenizer_mismatch_is_refused(shards, tmp_path, data_tokenizer_dir):
    manifest, _ = shards
    proc = torchrun(1, args(manifest, data_tokenizer_dir, "--train-iters", "1"), check=False)
    assert proc.returncode != 0 and "tokenizer" in proc.stderr.lower()
