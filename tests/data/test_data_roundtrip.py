"""A real corpus (stdlib sources) through tools/preprocess_data.py and back: every token, every byte."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data import build_pretraining_data
from data.chunks import iter_documents
from data.manifest_io import load_manifest
from data.tokenizer import load_tokenizer, tokenizer_identity
from tools import preprocess_data

REPO = Path(__file__).resolve().parents[2]


def preprocess(inputs, tokenizer, out, *extra):
    args = ["--input", *map(str, inputs), "--tokenizer", tokenizer, "--output-dir", str(out), "--quiet", *extra]
    assert preprocess_data.main(args) == 0
    return str(Path(out) / "manifest.json")


@pytest.fixture(scope="module")
def stdlib_dataset(tmp_path_factory, data_stdlib_files, data_tokenizer_dir):
    out = tmp_path_factory.mktemp("stdlib") / "ds"
    return preprocess(data_stdlib_files, data_tokenizer_dir, out, "--workers", "2", "--shard-size", "256KiB",
                      "--chunk-tokens", "16Ki")


def test_every_token_round_trips(stdlib_dataset, data_stdlib_files, data_tokenizer_dir):
    tok = load_tokenizer(data_tokenizer_dir)
    manifest = load_manifest(stdlib_dataset)
    docs = list(iter_documents(manifest))
    texts = [p.read_text(encoding="utf-8") for p in data_stdlib_files]
    assert len(docs) == len(texts) == manifest.total_docs
    assert sum(d.size for d in docs) == manifest.total_tokens
    for doc, text in zip(docs, texts):
        expected = tok.tokenizer.encode(text, add_special_tokens=False).ids + [tok.eod_id]
        np.testing.assert_array_equal(doc, expected)
        assert tok.tokenizer.decode(doc[:-1].tolist(), skip_special_tokens=False) == text


def test_manifest_and_shards_are_as_specified(stdlib_dataset, data_tokenizer_dir):
    import webdataset as wds

    manifest = load_manifest(stdlib_dataset)
    assert manifest.tokenizer == tokenizer_identity(data_tokenizer_dir)
    assert manifest.dtype == "uint16" and manifest.eod_id == load_tokenizer(data_tokenizer_dir).eod_id
    assert len(manifest.shards) > 3
    for i, info in enumerate(manifest.shards):
        path = manifest.shard_url(i)
        assert re.fullmatch(r"shard_\d{6}\.tar", info.path)
        data = Path(path).read_bytes()
        assert len(data) == info.bytes and hashlib.sha256(data).hexdigest() == info.sha256
        with tarfile.open(path) as tf:  # a plain tar with deterministic headers
            members = tf.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
            assert [m.name for m in members[:2]] == ["000000.tokens", "000000.lengths"]
        samples = list(wds.WebDataset(path, shardshuffle=False))  # and plain webdataset reads it
        assert sum(np.frombuffer(s["lengths"], "<u4").size for s in samples) == info.docs
        assert sum(len(s["tokens"]) for s in samples) == 2 * info.tokens


@pytest.mark.integration
def test_same_bytes_for_same_input_from_the_cli(stdlib_dataset, data_stdlib_files, data_tokenizer_dir, tmp_path):
    out = tmp_path / "again"
    cmd = [sys.executable, str(REPO / "tools/preprocess_data.py"), "--input", *map(str, data_stdlib_files),
           "--tokenizer", data_tokenizer_dir, "--output-dir", str(out), "--workers", "1", "--shard-size", "256KiB",
           "--chunk-tokens", "16Ki"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["docs"] == len(data_stdlib_files)
    first = Path(stdlib_dataset).parent
    assert sorted(os.listdir(first)) == sorted(os.listdir(out))
    for name in os.listdir(first):
        assert (first / name).read_bytes() == (out / name).read_bytes(), name
    inspect = subprocess.run([sys.executable, str(REPO / "tools/inspect_shards.py"), str(out / "manifest.json"),
                              "--verify", "--vocab-size", "1000"], capture_output=True, text=True, cwd=tmp_path)
    assert inspect.returncode == 0, inspect.stderr
    summary = json.loads(inspect.stdout)
    assert summary["bad_shards"] == [] and summary["total_docs"] == len(data_stdlib_files)


def test_jsonl_gz_parquet_and_text_inputs_agree(data_stdlib_files, data_tokenizer_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = data_stdlib_files[:12]
    texts = [p.read_text(encoding="utf-8") for p in files]
    records = [json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts)]
    (tmp_path / "a.jsonl").write_text("".join(records[:6]) + "\n")  # a blank line is skipped
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(records[6:]))
    pq.write_table(pa.table({"body": texts[:5] + [""], "n": list(range(6))}), tmp_path / "c.parquet")
    outs = [
        preprocess(files, data_tokenizer_dir, tmp_path / "text", "--workers", "1"),
        preprocess([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"], data_tokenizer_dir, tmp_path / "json",
                   "--json-key", "body", "--workers", "2"),
    ]
    ref = [Path(o).parent for o in outs]
    for name in os.listdir(ref[0]):
        if name == preprocess_data.SETTINGS_NAME:  # names the inputs, which differ
            continue
        assert (ref[0] / name).read_bytes() == (ref[1] / name).read_bytes(), name
    pq_out = preprocess([tmp_path / "c.parquet"], data_tokenizer_dir, tmp_path / "pq", "--json-key", "body")
    five = preprocess(files[:5], data_tokenizer_dir, tmp_path / "five")
    assert Path(pq_out).read_bytes() == Path(five).read_bytes()  # the empty row is dropped


def test_packed_reader_round_trips_the_real_corpus(stdlib_dataset, data_stdlib_files, data_tokenizer_dir):
    tok = load_tokenizer(data_tokenizer_dir)
    texts = {p.read_text(encoding="utf-8") for p in data_stdlib_files}
    assert not any(tok.eod_token in t for t in texts)  # so EOD splits documents exactly
    manifest = load_manifest(stdlib_dataset)
    seq, gbs = 512, 4
    loader = build_pretraining_data([stdlib_dataset], seq, gbs, 0, 1, seed=3, vocab_size=1000,
                                    tokenizer_dir=data_tokenizer_dir)
    steps = 3 * manifest.total_tokens // (gbs * seq)
    rows = [[] for _ in range(gbs)]
    for _ in range(steps):
        batch = next(loader)["tokens"].numpy()
        for r in range(gbs):
            rows[r].append(batch[r] if not rows[r] else batch[r][1:])
    seen = set()
    for parts in rows:
        seq_tokens = np.concatenate(parts)
        ends = np.flatnonzero(seq_tokens == tok.eod_id)
        for a, b in zip(np.concatenate([[0], ends[:-1] + 1]), ends):
            text = tok.tokenizer.decode(seq_tokens[a:b].tolist(), skip_special_tokens=False)
            assert text in texts
            seen.add(text)
    assert seen == texts


def test_on_disk_overhead_below_one_percent(tmp_path):
    from data.writer import ShardWriter

    rng = np.random.default_rng(0)
    lengths = np.maximum(2, rng.lognormal(6.0, 1.2, size=5000).astype(np.int64))
    tokens = rng.integers(1, 154880, size=int(lengths.sum()), dtype=np.uint32)
    tokens[np.cumsum(lengths) - 1] = 0
    with ShardWriter(str(tmp_path / "ds"), tokenizer={"name": "x", "sha256": "0", "vocab_size": 154880}, eod_id=0,
                     dtype="uint32", shard_size=1 << 30) as writer:
        writer.add_documents(tokens, lengths)
    manifest = load_manifest(str(tmp_path / "ds" / "manifest.json"))
    on_disk = sum(os.path.getsize(manifest.shard_url(i)) for i in range(len(manifest.shards)))
    assert on_disk / (4 * manifest.total_tokens) < 1.01


def test_tokenizer_identity_is_content_based(data_tokenizer_dir, data_stdlib_files, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from data.tokenizer import train_bpe_tokenizer

    PreTrainedTokenizerFast.from_pretrained(data_tokenizer_dir).save_pretrained(tmp_path / "copy")
    same = tokenizer_identity(str(tmp_path / "copy"))
    assert same["sha256"] == tokenizer_identity(data_tokenizer_dir)["sha256"]
    other = tokenizer_identity(train_bpe_tokenizer(data_stdlib_files[:3], 600, str(tmp_path / "other")))
    assert other["sha256"] != same["sha256"] and other["vocab_size"] == 600
