"""Checkpoints are data: crafted `.metadata` and crafted stored objects are refused, naming the checkpoint
and file, by training and by the export, and their code never runs (it would create a file); exports and
imports never replace their input or a checkpoint, whatever --force says; a damaged checkpoint is named
(iteration, file, what) with the newest intact iteration, which `--ckpt-step N` loads. In-process
trainers (tests/inprocess.py): one rank, two iterations."""

from __future__ import annotations

import dataclasses
import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.checkpointer import CheckpointError
from tests.conftest import gpu_only
from tests.helpers import TE, gpu_tiny_args, run_logged
from tests.inprocess import one_rank, trainer  # noqa: F401 (fixture)
from tools import export_hf

RUN = ["--preset", "tiny", "--mock-data", "--global-batch-size", "4", "--seq-length", "32", "--seed", "7",
       "--train-iters", "2"]


class _RunsCode:
    """Unpickling this creates a file: what a checkpoint altered on shared storage could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def saved(one_rank, tmp_path_factory):
    """Checkpoints of iterations 1 and 2 of RUN."""
    ck = tmp_path_factory.mktemp("safety") / "ck"
    with trainer([*RUN, "--save", str(ck), "--save-interval", "1"]) as t:
        t.train()
    return ck


def _copy(saved, tmp_path) -> Path:
    ck = tmp_path / "ck"
    shutil.copytree(saved, ck)
    return ck


def _read_metadata(directory: Path):
    with open(directory / ".metadata", "rb") as f:
        return pickle.load(f)  # the test's own file, as torch wrote it


def _write_metadata(directory: Path, metadata) -> None:
    with open(directory / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def craft_metadata(directory: Path, marker: Path) -> None:
    metadata = _read_metadata(directory)
    metadata.planner_data = {"x": _RunsCode(str(marker))}
    _write_metadata(directory, metadata)


def craft_byte_item(directory: Path, marker: Path, fp8_state: bool = False) -> str:
    """Replace one stored object (an `_extra_state`) with a payload appended to its file; returns the file.
    `fp8_state`: the payload is a byte tensor, as Transformer Engine stores its FP8 state (and unpickles it)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = _read_metadata(directory)
    key = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    index = next(i for i in metadata.storage_data if i.fqn == key)
    info = metadata.storage_data[index]
    payload = io.BytesIO()
    code = _RunsCode(str(marker))
    torch.save([torch.frombuffer(bytearray(pickle.dumps(code)), dtype=torch.uint8) if fp8_state else code], payload)
    path = directory / info.relative_path
    offset = path.stat().st_size
    with open(path, "ab") as f:
        f.write(payload.getvalue())
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload.getvalue()))
    _write_metadata(directory, metadata)
    return info.relative_path


@pytest.mark.parametrize("kind", ["metadata", "byte item", "fp8 state"])
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(saved, tmp_path, kind):
    ck, marker = _copy(saved, tmp_path), tmp_path / "code-ran"
    it2 = ck / "iter_0000002"
    where = ".metadata" if kind == "metadata" else craft_byte_item(it2, marker, fp8_state=kind == "fp8 state")
    if kind == "fp8 state":
        where = str(it2)  # a tensor for torch; Transformer Engine would pickle.loads it
    if kind == "metadata":
        craft_metadata(it2, marker)
    with pytest.raises(CheckpointError, match="refused") as refused:
        with trainer([*RUN, "--load", str(ck)]):
            pass
    assert not marker.exists()
    assert str(ck) in str(refused.value) and where in str(refused.value) and ".open" in str(refused.value)  # what it asked for
    # the export: refused by name (exit 2), nothing written, nothing run
    from megatron.core import parallel_state

    out = tmp_path / "hf"
    try:  # --verify loads the checkpoint into our model (megatron-core's load): in this process
        assert export_hf.main(["--load", str(ck), "--output", str(out), "--verify"]) == 2
    finally:
        parallel_state.destroy_model_parallel()
    assert not marker.exists() and not out.exists()


def test_exports_and_imports_never_replace_their_input_or_a_checkpoint(saved, tmp_path, capsys):
    from tools import import_hf

    ck = _copy(saved, tmp_path)
    run = ck.parent  # demo.sh's layout: RUN/ckpt beside RUN/tb
    (run / "tb").mkdir()
    before = sorted(p.name for p in ck.iterdir())
    for output in (ck, run, ck / "iter_0000002", ck / "hf"):
        assert export_hf.main(["--load", str(ck), "--output", str(output), "--force"]) == 2, output
        assert str(output) in capsys.readouterr().err
    other = tmp_path / "other-run"  # another run's checkpoint below the output
    shutil.copytree(saved, other / "ckpt")
    assert export_hf.main(["--load", str(ck), "--output", str(other), "--force"]) == 2
    assert "holds a checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in ck.iterdir()) == before and (other / "ckpt" / "iter_0000002").is_dir()
    # import_hf --force never replaces a checkpoint either, nor its --hf input (refused before any work)
    hf = tmp_path / "hf-model"
    hf.mkdir()
    args = import_hf.build_parser().parse_args(["--hf", str(hf), "--save", str(ck), "--force"])
    with pytest.raises(ValueError, match="holds a checkpoint"):
        import_hf.import_hf(args)
    args = import_hf.build_parser().parse_args(["--hf", str(hf), "--save", str(tmp_path), "--force"])
    with pytest.raises(ValueError, match="would delete the input"):
        import_hf.import_hf(args)
    assert sorted(p.name for p in ck.iterdir()) == before


def test_a_damaged_checkpoint_is_named_with_the_newest_intact_one(saved, tmp_path):
    ck = _copy(saved, tmp_path)
    shard = sorted((ck / "iter_0000002").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError) as damaged:
        with trainer([*RUN, "--load", str(ck), "--train-iters", "4"]):  # a schedule change: asked only after
            pass
    msg = str(damaged.value)
    assert "iteration 2 is damaged" in msg and shard.name in msg and "truncated" in msg
    assert "newest intact iteration is 1" in msg and "--ckpt-step 1" in msg
    with trainer([*RUN, "--load", str(ck), "--ckpt-step", "1"]) as t:
        assert t.iteration == 1
    whole = (saved / "iter_0000002" / shard.name).read_bytes()  # damaged in place: the sizes are right
    shard.write_bytes(whole[:64] + bytes(len(whole) - 128) + whole[-64:])
    with pytest.raises(CheckpointError, match="iteration 2 could not be read: .*--ckpt-step 1"):
        with trainer([*RUN, "--load", str(ck)]):
            pass
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} is missing"):
        with trainer([*RUN, "--load", str(ck)]):
            pass
    (ck / "latest_checkpointed_iteration.txt").write_text("3\n")  # points past what was published
    with pytest.raises(CheckpointError, match="--ckpt-step 1"):
        with trainer([*RUN, "--load", str(ck)]):
            pass


@gpu_only
@pytest.mark.integration
def test_an_fp8_checkpoint_resumes_its_fp8_state_passing_the_allowlist(tmp_path, fp8_tiny_config):
    """TE's FP8 extra state is a pickled byte tensor; a load unpickles it first with megatron-core's allowlist
    (pretrain/checkpoint/extra_state.py) and refuses anything else: a real FP8 run's state must pass."""
    common = [*gpu_tiny_args(fp8_tiny_config), *TE, "--fp8-recipe", "delayed", "--train-iters", "3"]  # last wins
    ckpt = tmp_path / "ckpt"
    run_logged(tmp_path, "first", [*common, "--save", str(ckpt), "--save-interval", "2", "--exit-interval", "2"])
    stdout, resumed = run_logged(tmp_path, "resumed", [*common, "--load", str(ckpt)])
    assert "loaded checkpoint" in stdout and sorted(resumed["lm loss"]) == [3]
