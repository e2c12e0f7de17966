"""Shared fixtures. Data pipeline: a real text corpus (Python's own stdlib sources), a byte-level BPE
trained on it, and a factory for synthetic datasets whose documents are identifiable by their first token."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    for item in items:  # `slow` is integration's former name
        if item.get_closest_marker("slow") and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)


DOC_ID_BASE = 1000  # synthetic document i starts with token DOC_ID_BASE + i; its other tokens are in [1, 100)


@pytest.fixture(scope="session")
def data_stdlib_files() -> list[Path]:
    """About 1 MB of real text: the first stdlib modules by name (non-empty)."""
    files, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        n = path.stat().st_size
        if n and size < 1_000_000:
            files.append(path)
            size += n
    assert size > 500_000, "the stdlib sources are missing"
    return files


@pytest.fixture(scope="session")
def data_tokenizer_dir(tmp_path_factory, data_stdlib_files) -> str:
    from data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(data_stdlib_files, 1000, str(tmp_path_factory.mktemp("bpe")))


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory, data_stdlib_files) -> tuple[Path, str]:
    """(manifest, tokenizer) of real token shards of ~0.5 MB of stdlib text, with a 500-token BPE (fits tiny's 512)."""
    from data.tokenizer import train_bpe_tokenizer

    work = tmp_path_factory.mktemp("corpus")
    tokenizer = train_bpe_tokenizer(data_stdlib_files[:40], 500, str(work / "tokenizer"))
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", *map(str, data_stdlib_files[:40]),
                    "--tokenizer", tokenizer, "--output-dir", str(work / "shards"), "--shard-size", "256KiB",
                    "--chunk-tokens", "8192", "--quiet"], cwd=REPO, check=True)
    return work / "shards" / "manifest.json", tokenizer


@pytest.fixture
def data_synthetic(tmp_path):
    """write(name, num_docs, ...) -> (manifest path, docs): docs[i] = token ids of document i without EOD."""

    def write(name="ds", num_docs=600, seed=0, max_len=120, shard_size=8 << 10, chunk_tokens=1024,
              token_offset=0, tokenizer_sha="0" * 64):
        from data.writer import ShardWriter

        rng = np.random.default_rng(seed)
        docs = []
        with ShardWriter(str(tmp_path / name), tokenizer={"name": "synthetic", "sha256": tokenizer_sha,
                                                           "vocab_size": 1 << 20},
                         eod_id=0, dtype="uint32", shard_size=shard_size, chunk_tokens=chunk_tokens) as writer:
            for i in range(num_docs):
                body = rng.integers(1, 100, size=int(rng.integers(0, max_len)), dtype=np.int64) + token_offset
                doc = np.concatenate([[DOC_ID_BASE + token_offset + i], body])
                docs.append(doc)
                writer.add_document(doc)
        return str(tmp_path / name / "manifest.json"), docs

    return write


# --- training runs shared by several test modules --------------------------------------------
TINY_RUN = ["--preset", "tiny", "--mock-data", "--train-iters", "8", "--global-batch-size", "8",
            "--micro-batch-size", "1", "--seed", "1234", "--lr", "3e-3", "--lr-warmup-iters", "2"]


@pytest.fixture(scope="session")
def tiny_reference_run(tmp_path_factory):
    """(stdout, TensorBoard scalars) of the uninterrupted single-process run of TINY_RUN: the first
    training run's checks and the reference that parallel layouts and resumed runs must match."""
    from tests.helpers import read_scalars, torchrun

    tb = tmp_path_factory.mktemp("tiny_reference")
    proc = torchrun(1, [*TINY_RUN, "--tensorboard-dir", str(tb)])
    return proc.stdout, read_scalars(tb)


@pytest.fixture(scope="session")
def tiny_reference(tiny_reference_run) -> dict:
    return tiny_reference_run[1]


@pytest.fixture(scope="session")
def grad_reference(tmp_path_factory) -> tuple[dict, dict]:
    """(TensorBoard scalars, step-1 gradient dump) of the single-process run of tests/grad_check.py's
    RUN: the reference every parallel layout of test_parallel_equivalence / test_context_parallel matches."""
    from tests import grad_check

    scalars, (grads,) = grad_check.train(tmp_path_factory.mktemp("grad_reference"), 1, grad_check.RUN)
    return scalars, grads


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real one-node SLURM cluster (tests/slurm_cluster.py), started once for every module that needs it;
    skipped, with the reason, where the daemons cannot run."""
    from tests.slurm_cluster import SlurmCluster, SlurmUnavailable

    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as e:
        pytest.skip(f"cannot run SLURM daemons here: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


# --- GPU tests (marked `gpu`: launch/gpu_check.sh runs them; skipped without CUDA) ------------------
def gpu_only(test):
    """Mark a test `gpu` and skip it without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@pytest.fixture(scope="session")
def fp8_tiny_config(tmp_path_factory):
    """config.json of tests.helpers.fp8_tiny(): the tiny model that TE's FP8 GEMMs accept."""
    from tests.helpers import fp8_tiny

    d = tmp_path_factory.mktemp("fp8_tiny")
    fp8_tiny().save_hf_json(d / "config.json")
    return d / "config.json"


@pytest.fixture(scope="session")
def te_reference(tmp_path_factory):
    """(scalars, per-rank gradient dumps) of tests/grad_check.py's RUN with Transformer Engine, one process:
    the reference of the TE variants (recompute, grouped GEMM, permute fusion, the flex dispatcher)."""
    from tests import grad_check
    from tests.helpers import TE

    return grad_check.train(tmp_path_factory.mktemp("te_ref"), 1, [*grad_check.RUN, *TE])
