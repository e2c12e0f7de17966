"""tools/preprocess_data.py at scale, without SLURM: the held-out split (--valid-fraction), the work split
(--task-index/--num-tasks, SLURM array defaults), --resume, and tools/merge_manifests.py's refusals.
The same flow on a real SLURM cluster: tests/tools/test_preprocess_slurm.py."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from data.chunks import iter_documents
from data.errors import ManifestError
from data.manifest_io import load_manifest
from data.tokenizer import load_tokenizer, train_bpe_tokenizer
from data.writer import ShardWriter
from tools import inspect_shards, merge_manifests, preprocess_data

F = 0.1


def run(inputs, tokenizer, out, *extra) -> int:
    return preprocess_data.main(["--input", *map(str, inputs), "--tokenizer", tokenizer, "--output-dir", str(out),
                                 "--quiet", "--workers", "1", "--shard-size", "64KiB", "--chunk-tokens", "4Ki", *extra])


def documents(path) -> list[bytes]:
    return sorted(doc.tobytes() for doc in iter_documents(load_manifest(str(path))))


@pytest.fixture(scope="module")
def line_corpus(tmp_path_factory, data_stdlib_files) -> tuple[list[Path], list[str]]:
    """Every non-empty line of the stdlib corpus as one document (~25k), in 4 jsonl files of different sizes."""
    lines = [line for f in data_stdlib_files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    root = tmp_path_factory.mktemp("lines")
    bounds = [0, len(lines) // 10, len(lines) // 3, len(lines) // 2, len(lines)]
    paths = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        paths.append(root / f"lines{i}.jsonl")
        paths[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[a:b]))
    return paths, lines


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, line_corpus, data_tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("held_out") / "one"
    assert run(line_corpus[0], data_tokenizer_dir, out, "--valid-fraction", str(F)) == 0
    return out


def test_valid_fraction_disjoint_and_complete(held_out, line_corpus, data_tokenizer_dir):
    train, valid = load_manifest(str(held_out / "manifest.json")), load_manifest(str(held_out / "valid-manifest.json"))
    total = train.total_docs + valid.total_docs
    assert total == len(line_corpus[1])
    assert abs(valid.total_docs / total - F) < 0.01, valid.total_docs / total
    tok = load_tokenizer(data_tokenizer_dir)
    expected = sorted(np.array([*ids, tok.eod_id], np.uint16).tobytes() for ids in tok.encode(line_corpus[1]))
    got_train, got_valid = documents(held_out / "manifest.json"), documents(held_out / "valid-manifest.json")
    assert sorted(got_train + got_valid) == expected  # every document once, in one split or the other
    assert not set(got_train) & set(got_valid)  # a line that occurs twice is held out both times or never


def test_inspect_verify_agrees_with_the_writers_outputs(held_out, capsys):
    """--valid-fraction's two manifests side by side: each verifies, and neither calls the other's shards unlisted."""
    for name in ("manifest.json", "valid-manifest.json"):
        assert inspect_shards.main([str(held_out / name), "--verify"]) == 0
        assert json.loads(capsys.readouterr().out)["unlisted_files"] == [], name


def test_valid_split_independent_of_workers_and_tasks(held_out, line_corpus, data_tokenizer_dir, tmp_path):
    """--workers 2 gives the same bytes; 3 tasks + merge give the same documents in each split."""
    assert run(line_corpus[0], data_tokenizer_dir, tmp_path / "w2", "--valid-fraction", str(F), "--workers", "2") == 0
    for name in ("manifest.json", "valid-manifest.json", "shard_000000.tar", "valid-shard_000000.tar"):
        assert (tmp_path / "w2" / name).read_bytes() == (held_out / name).read_bytes(), name
    split = tmp_path / "split"
    for i in range(3):
        assert run(line_corpus[0], data_tokenizer_dir, split, "--valid-fraction", str(F),
                   "--task-index", str(i), "--num-tasks", "3") == 0
    assert merge_manifests.main([str(split), "--output", str(split / "manifest.json"), "--verify",
                                 "--workers", "1"]) == 0
    for name in ("manifest.json", "valid-manifest.json"):
        assert documents(split / name) == documents(held_out / name), name
    parts = [load_manifest(str(split / f"part-{i:05d}-of-00003.manifest.json")) for i in range(3)]
    assert sorted(len(p.part["inputs"]) for p in parts) == [1, 1, 2]  # 4 files, balanced by size
    assert load_manifest(str(split / "manifest.json")).part is None


def test_resume_skips_finished_and_refuses_other_settings(line_corpus, data_tokenizer_dir, tmp_path, capsys):
    inputs, out = line_corpus[0][:1], tmp_path / "ds"
    assert run(inputs, data_tokenizer_dir, out, "--task-index", "0", "--num-tasks", "2") == 0
    manifest = out / "part-00000-of-00002.manifest.json"
    before = manifest.stat().st_mtime_ns
    capsys.readouterr()
    assert run(inputs, data_tokenizer_dir, out, "--task-index", "0", "--num-tasks", "2") == 1
    assert "already holds a dataset (part-00000-of-00002.manifest.json); use an empty directory, or --resume" \
        in capsys.readouterr().err
    assert run(inputs, data_tokenizer_dir, out, "--task-index", "0", "--num-tasks", "2", "--resume") == 0
    assert "is complete: nothing to do" in capsys.readouterr().err and manifest.stat().st_mtime_ns == before
    assert run(inputs, data_tokenizer_dir, out, "--task-index", "1", "--num-tasks", "2", "--resume",
               "--chunk-tokens", "8Ki") == 1
    assert "chunk_tokens: 4096 before, 8192 now" in capsys.readouterr().err
    assert run(line_corpus[0][:2], data_tokenizer_dir, out, "--task-index", "1", "--num-tasks", "2", "--resume") == 1
    assert "inputs: 1 files" in capsys.readouterr().err
    other = train_bpe_tokenizer(inputs, 300, str(tmp_path / "other_tok"))
    assert run(inputs, other, out, "--task-index", "1", "--num-tasks", "2", "--resume") == 1
    assert re.search(r"tokenizer: \S+ \(sha256 \w{12}, vocab 1000\) before, other_tok \(sha256 \w{12}, vocab 300\) now",
                     capsys.readouterr().err)
    assert not (out / "part-00001-of-00002.manifest.json").exists()
    # A task that died: complete-looking shards, no manifest. Without --resume that is an error; with it, redone.
    os.rename(manifest, tmp_path / "saved.json")
    (out / "part-00000-of-00002.shard_000099.tar.tmp").write_bytes(b"half")
    assert run(inputs, data_tokenizer_dir, out, "--task-index", "0", "--num-tasks", "2") == 1
    assert "from a run that did not finish?" in capsys.readouterr().err
    assert run(inputs, data_tokenizer_dir, out, "--task-index", "0", "--num-tasks", "2", "--resume") == 0
    assert not (out / "part-00000-of-00002.shard_000099.tar.tmp").exists()
    assert manifest.read_bytes() == (tmp_path / "saved.json").read_bytes()


def test_task_from_slurm_array(monkeypatch):
    args = preprocess_data.build_parser().parse_args(["--input", "x", "--tokenizer", "t", "--output-dir", "o"])
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert preprocess_data.task_of(args) is None
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert preprocess_data.task_of(args) == (2, 4)  # --array=5-8
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")
    assert preprocess_data.task_of(args) == (1, 4)  # --array=5-11:2
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "8")
    with pytest.raises(ValueError, match="not a range"):
        preprocess_data.task_of(args)
    args.task_index, args.num_tasks = 0, 3  # flags win
    assert preprocess_data.task_of(args) == (0, 3)
    sizes = [50, 10, 40, 30, 20, 20]
    shares = preprocess_data.split_files([f"f{i}" for i in range(6)], sizes, 3)
    assert shares == [["f0", "f1"], ["f2", "f5"], ["f3", "f4"]]  # 60 / 60 / 50, each in input order


# --- merge_manifests' refusals, on small synthetic parts -----------------------------------------------
def write_part(directory: Path, index: int, count: int, sha: str = "a" * 64, first_doc: int = 0) -> str:
    tokenizer = {"name": "t", "sha256": sha, "vocab_size": 1000}
    with ShardWriter(str(directory), tokenizer=tokenizer, eod_id=0, dtype="uint16", shard_size=2048,
                     chunk_tokens=64, prefix=preprocess_data.part_prefix(index, count),
                     part={"index": index, "count": count, "inputs": []}) as w:
        for doc in range(first_doc, first_doc + 30):
            w.add_document([1 + doc % 900] * (1 + doc % 17))
    return str(directory / f"{preprocess_data.part_prefix(index, count)}manifest.json")


def merge(*args) -> int:
    return merge_manifests.main([*map(str, args)])


def test_merge_writes_exact_totals(tmp_path):
    parts = [write_part(tmp_path, i, 3, first_doc=30 * i) for i in range(3)]
    assert merge(tmp_path, "--output", tmp_path / "manifest.json") == 0
    merged = load_manifest(str(tmp_path / "manifest.json"))
    loaded = [load_manifest(p) for p in parts]
    assert merged.total_docs == sum(p.total_docs for p in loaded) == 90
    assert merged.total_tokens == sum(p.total_tokens for p in loaded)
    assert [s.path for s in merged.shards] == [s.path for p in loaded for s in p.shards]
    assert sorted(documents(tmp_path / "manifest.json")) == sorted(d for p in parts for d in documents(p))


def test_merge_refuses_a_missing_part(tmp_path, capsys):
    for i in (0, 2):
        write_part(tmp_path, i, 3)
    (tmp_path / "part-00001-of-00003.shard_000000.tar").write_bytes(b"left by a killed task")
    assert merge(tmp_path, "--output", tmp_path / "manifest.json") == 1
    assert "missing part(s) 1 of 3" in capsys.readouterr().err
    assert not (tmp_path / "manifest.json").exists()


def test_merge_refuses_different_tokenizers(tmp_path, capsys):
    write_part(tmp_path, 0, 2)
    other = write_part(tmp_path, 1, 2, sha="b" * 64)
    assert merge(tmp_path, "--output", tmp_path / "manifest.json") == 1
    err = capsys.readouterr().err
    assert f"{other} was made with tokenizer t (sha256 bbbbbbbbbbbb" in err and "aaaaaaaaaaaa" in err


def test_merge_refuses_a_shard_listed_twice(tmp_path, capsys):
    first = write_part(tmp_path / "a", 0, 2)
    second = write_part(tmp_path / "b", 1, 2)
    obj = json.loads(Path(second).read_text())
    obj["shards"][0]["path"] = os.path.join(tmp_path, "a", "part-00000-of-00002.shard_000000.tar")
    Path(second).write_text(json.dumps(obj))
    assert merge(first, second, "--output", tmp_path / "manifest.json") == 1
    assert f"part-00000-of-00002.shard_000000.tar is listed twice: in {first} and {second}" in capsys.readouterr().err
    assert merge(first, first, "--output", tmp_path / "manifest.json") == 1
    assert "part 0 of 2 is given twice" in capsys.readouterr().err
    with pytest.raises(ManifestError, match="listed twice"):  # within one manifest: load_manifest itself
        obj["shards"][1]["path"] = obj["shards"][0]["path"]
        Path(second).write_text(json.dumps(obj))
        load_manifest(second)


def test_merge_never_overwrites_a_part_it_merges(tmp_path, capsys):
    parts = [write_part(tmp_path, i, 2, first_doc=30 * i) for i in range(2)]
    before = Path(parts[0]).read_bytes()
    assert merge(*parts, "--output", parts[0]) == 1
    assert f"--output {parts[0]} is one of the part manifests" in capsys.readouterr().err
    assert Path(parts[0]).read_bytes() == before
