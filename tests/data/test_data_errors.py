"""Bad input is caught and named: missing, truncated or corrupt shards, out-of-vocab ids, manifests that do not
match, the wrong tokenizer; --skip-bad-shards logs and counts instead; inspect_shards --verify names them all."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from data import build_pretraining_data
from data.errors import ManifestError, ShardError
from data.manifest_io import load_manifest

from tools import inspect_shards, preprocess_data

SEQ, GBS = 32, 8


def read_all(path, epochs=2, **kw):
    """Iterate long enough that every shard is read."""
    loader = build_pretraining_data([path], SEQ, GBS, 0, 1, seed=0, **kw)
    for _ in range(epochs * load_manifest(path, allow_pipe=kw.get("allow_pipe", False)).total_tokens // (GBS * SEQ) + 20):
        next(loader)
    return loader


def edit_manifest(path, fn):
    obj = json.loads(Path(path).read_text())
    fn(obj)
    Path(path).write_text(json.dumps(obj))


def shard_file(path, i):
    return os.path.join(os.path.dirname(path), f"shard_{i:06d}.tar")


def overwrite(file, offset, data: bytes):
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture
def dataset(data_synthetic):
    path, _ = data_synthetic(num_docs=300)
    assert len(load_manifest(path).shards) >= 6
    return path


def test_missing_shard_is_named(dataset):
    os.remove(shard_file(dataset, 3))
    with pytest.raises(ShardError, match=r"shard_000003\.tar: shard is missing"):
        read_all(dataset)


def test_truncated_shard_is_named(dataset):
    os.truncate(shard_file(dataset, 2), 3000)
    with pytest.raises(ShardError, match=r"shard_000002\.tar: shard is 3000 bytes, its manifest entry says"):
        read_all(dataset)


def test_truncated_shard_read_through_a_pipe_is_named(dataset):
    files = [shard_file(dataset, i) for i in range(len(load_manifest(dataset).shards))]
    edit_manifest(dataset, lambda m: [s.update(path=f"pipe:cat {f}") for s, f in zip(m["shards"], files)])
    read_all(dataset, epochs=1, allow_pipe=True)  # pipe: shards read fine when allowed explicitly
    os.truncate(files[1], 3000)
    with pytest.raises(ShardError, match=r"pipe:cat .*shard_000001\.tar: truncated"):
        read_all(dataset, allow_pipe=True)


def test_manifest_naming_a_command_is_refused(dataset):
    """A manifest is data: a pipe: (or other command-running) shard location is refused unless allowed."""
    first = load_manifest(dataset).shard_url(0)
    edit_manifest(dataset, lambda m: m["shards"][3].update(path=f"pipe:touch {dataset}.ran; cat {first}"))
    for opener in (lambda: load_manifest(dataset), lambda: build_pretraining_data([dataset], SEQ, GBS, 0, 1, seed=0)):
        with pytest.raises(ManifestError, match=r"manifest\.json: shard 'pipe:touch .*' is a pipe: location"):
            opener()
    edit_manifest(dataset, lambda m: m["shards"][3].update(path="ais://bucket/shard.tar"))
    with pytest.raises(ManifestError, match="is a ais: location"):
        load_manifest(dataset)
    assert not os.path.exists(f"{dataset}.ran")
    edit_manifest(dataset, lambda m: m["shards"][3].update(path="https://example.com/shard.tar"))
    assert load_manifest(dataset).shards[3].path == "https://example.com/shard.tar"  # URLs are data


def test_corrupt_header_is_named(dataset):
    overwrite(shard_file(dataset, 4), 100, b"\x17" * 8)  # inside the first member's header
    with pytest.raises(ShardError, match=r"shard_000004\.tar: corrupt tar header"):
        read_all(dataset)


def test_token_at_or_over_vocab_size_is_named(dataset):
    overwrite(shard_file(dataset, 1), 512, (5000).to_bytes(4, "little"))  # first token of the first chunk
    edit_manifest(dataset, lambda m: m["shards"][1].update(max_token_id=-1))  # the manifest does not know
    read_all(dataset, vocab_size=5001)
    with pytest.raises(ShardError, match=r"shard_000001\.tar: chunk 000000: token id 5000 is >= the vocab size 5000"):
        read_all(dataset, vocab_size=5000)


def test_vocab_checked_against_the_manifest_before_reading(dataset):
    with pytest.raises(ValueError, match=r"shard_\d{6}\.tar: token id \d+ >= vocab_size 500"):
        build_pretraining_data([dataset], SEQ, GBS, 0, 1, seed=0, vocab_size=500)


def test_manifest_that_does_not_match_its_shards(dataset):
    def one_more_doc(m):
        m["shards"][2]["docs"] += 1
        m["total_docs"] += 1

    edit_manifest(dataset, one_more_doc)
    with pytest.raises(ShardError, match=r"shard_000002\.tar: holds .* docs .* its manifest entry says"):
        read_all(dataset)
    edit_manifest(dataset, lambda m: m.update(total_tokens=m["total_tokens"] + 5))
    with pytest.raises(ManifestError, match=r"manifest\.json: total_docs/total_tokens"):
        load_manifest(dataset)
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(dataset + ".missing")


def test_wrong_tokenizer_is_rejected(dataset, data_tokenizer_dir):
    with pytest.raises(ValueError, match="is not the tokenizer"):
        build_pretraining_data([dataset], SEQ, GBS, 0, 1, seed=0, tokenizer_dir=data_tokenizer_dir)


def test_skip_bad_shards_logs_and_counts(dataset, caplog):
    os.remove(shard_file(dataset, 0))
    overwrite(shard_file(dataset, 5), 100, b"\x17" * 8)
    with caplog.at_level(logging.WARNING):
        loader = read_all(dataset, skip_bad_shards=True, num_workers=2)
    named = " ".join(loader.skipped_shards)
    assert "shard_000000.tar: shard is missing" in named and "shard_000005.tar: corrupt tar header" in named
    assert len(loader.skipped_shards) >= 2
    assert "skipping bad shard" in caplog.text or "skipped" in caplog.text


def test_inspect_verify_names_every_bad_shard(dataset, capsys):
    assert inspect_shards.main([dataset, "--verify"]) == 0
    capsys.readouterr()
    os.remove(shard_file(dataset, 0))
    os.truncate(shard_file(dataset, 2), 3000)
    overwrite(shard_file(dataset, 4), 600, b"\x01\x02\x03\x04")  # payload only: just the sha256 catches it
    assert inspect_shards.main([dataset, "--verify", "--workers", "2"]) == 1
    out, err = capsys.readouterr()
    bad = json.loads(out)["bad_shards"]
    assert [b["path"] for b in bad] == ["shard_000000.tar", "shard_000002.tar", "shard_000004.tar"]
    assert "shard is missing" in err and "3000 bytes" in err and "sha256" in err


def test_preprocess_names_bad_input(data_tokenizer_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    assert preprocess_data.main(["--input", str(bad), "--tokenizer", data_tokenizer_dir,
                                 "--output-dir", str(tmp_path / "o1"), "--quiet", "--workers", "1"]) == 1
    assert "bad.jsonl:2: not a JSON object" in capsys.readouterr().err
    bad.write_text('{"content": "x"}\n')
    assert preprocess_data.main(["--input", str(bad), "--tokenizer", data_tokenizer_dir,
                                 "--output-dir", str(tmp_path / "o2"), "--quiet", "--workers", "1"]) == 1
    assert "bad.jsonl:1: no string field 'text' (--json-key)" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "manifest.json").exists()
    # the corrected command (another --json-key) into the same directory: the failed run wrote no data
    assert preprocess_data.main(["--input", str(bad), "--tokenizer", data_tokenizer_dir, "--json-key", "content",
                                 "--output-dir", str(tmp_path / "o2"), "--quiet", "--workers", "1"]) == 0, \
        capsys.readouterr().err
    assert (tmp_path / "o2" / "manifest.json").exists()
    capsys.readouterr()
    # --resume removes an unfinished run's files, never an input that lives there with such a name
    named_like_a_shard = tmp_path / "o4" / "shard_input.txt"
    named_like_a_shard.parent.mkdir()
    named_like_a_shard.write_text("my data")
    args = ["--input", str(named_like_a_shard), "--tokenizer", data_tokenizer_dir, "--output-dir",
            str(tmp_path / "o4"), "--quiet", "--workers", "1", "--resume"]
    assert preprocess_data.main(args) == 1  # the writer refuses the name; the input stays
    assert "shard_input.txt" in capsys.readouterr().err and named_like_a_shard.read_text() == "my data"
    good = tmp_path / "good.txt"
    good.write_text("hello")
    args = ["--input", str(good), "--tokenizer", data_tokenizer_dir, "--output-dir", str(tmp_path / "o3"), "--quiet"]
    assert preprocess_data.main(args) == 0
    capsys.readouterr()
    assert preprocess_data.main(args) == 1
    assert "already holds a dataset" in capsys.readouterr().err


def test_startup_checks_every_listed_shard_before_iteration_1(data_synthetic, capsys):
    """Training and validation shards: each must exist with its recorded size before the first step; the
    error names the first few; --skip-bad-shards logs them instead (the reader skips them when reached)."""
    from tests.helpers import one_rank_gloo_world
    from tests.inprocess import refused, trainer

    train, _ = data_synthetic("train", num_docs=300)
    valid, _ = data_synthetic("valid", num_docs=200, seed=1)
    os.remove(shard_file(train, 3))
    os.truncate(shard_file(valid, 0), 3000)
    run = ["--preset", "tiny", "--vocab-size", "2000", "--global-batch-size", "8", "--seq-length", "32",
           "--train-iters", "1", "--data-path", train, "--valid-data-path", valid, "--eval-interval", "1",
           "--eval-iters", "2"]
    with refused(ShardError, match="2 of the") as error:
        with trainer(run):
            pass
    msg = str(error.value)
    assert f"{shard_file(train, 3)} is missing" in msg and f"{shard_file(valid, 0)} has 3000 bytes" in msg
    with one_rank_gloo_world(), trainer([*run, "--skip-bad-shards"]):
        pass
    assert "--skip-bad-shards: they are skipped when reached" in capsys.readouterr().out


def test_the_shard_check_is_spread_over_ranks(dataset):
    from data.shard_check import local_problems

    manifest = load_manifest(dataset)
    for i in range(len(manifest.shards)):
        os.remove(shard_file(dataset, i))
    shares = [local_problems([manifest, manifest], rank, 4) for rank in range(4)]
    assert sum(count for count, _ in shares) == 2 * len(manifest.shards)
    assert max(count for count, _ in shares) - min(count for count, _ in shares) <= 1
