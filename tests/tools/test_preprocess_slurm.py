"""launch/slurm/preprocess.sbatch on a real SLURM cluster (tests/slurm_cluster.py, the shared `slurm` fixture):
an array of 3 tokenizer tasks over the stdlib corpus and the merge job behind it (--dependency=afterok).

The first submission's task 1 hangs after its first shard (fault injection) and is killed with scancel, so
the merge never runs (its dependency failed) and task 1 leaves complete-looking shards but no part manifest.
Submitting the same command again skips tasks 0 and 2 (their files untouched), redoes task 1 from scratch and
merges: the merged training and held-out manifests hold exactly the documents of a single-process run.
"""

from __future__ import annotations

import os
import re
import sys
import time

import pytest

from data.chunks import iter_documents
from data.manifest_io import load_manifest
from tests.helpers import ROOT
from tests.slurm_cluster import wait_for
from tools import preprocess_data

SBATCH = ROOT / "launch" / "slurm" / "preprocess.sbatch"
FLAGS = ["--shard-size", "64KiB", "--chunk-tokens", "4Ki", "--valid-fraction", "0.1"]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def documents(manifest_path: str) -> list[bytes]:
    return sorted(doc.tobytes() for doc in iter_documents(load_manifest(manifest_path)))


@pytest.mark.integration
def test_array_killed_task_resubmitted_then_merged(slurm, tmp_path, data_stdlib_files, data_tokenizer_dir):
    files = [str(f) for f in data_stdlib_files]
    reference = tmp_path / "single"
    assert preprocess_data.main(["--input", *files, "--tokenizer", data_tokenizer_dir, "--output-dir",
                                 str(reference), "--workers", "1", "--quiet", *FLAGS]) == 0
    out = tmp_path / "array"
    command = ["bash", str(SBATCH), "--input", *files, "--tokenizer", data_tokenizer_dir,
               "--output-dir", str(out), *FLAGS]
    env = dict(TASKS="3", CPUS="1", PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    submitted = []

    def submit(**extra) -> tuple[str, str]:
        proc = slurm.run(*command, env=slurm.env(**env, **extra), cwd=ROOT)
        found = re.search(r"submitted array job (\d+) .* merge job (\d+)", proc.stdout)
        assert found, proc.stdout + proc.stderr
        submitted.extend(found.groups())
        return found.group(1), found.group(2)

    def state(job: str) -> str:
        return slurm.job_state(job).get("JobState", "")

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((out / "logs").glob("*.out")))

    def diagnostics() -> str:
        return f"{logs()}\n{slurm.daemon_logs()}"

    try:
        check_flow(slurm, out, reference, submit, state, logs, diagnostics)
    finally:  # the cluster is shared: leave no job behind (a hung task if an assertion failed)
        slurm.run("scancel", *submitted, check=False)


def check_flow(slurm, out, reference, submit, state, logs, diagnostics):
    """Submit, kill task 1, check that nothing looks finished; submit again, check the merged result."""
    start = time.monotonic()
    # 1. Task 1 hangs once its first shard is written; scancel kills it there.
    array, merge = submit(GLM5_INJECT_FAULT="hang@preprocess-task1-shard1")
    wait_for(lambda: (out / "part-00001-of-00003.shard_000000.tar").exists(), 180, "task 1's first shard",
             diagnostics)
    slurm.run("scancel", f"{array}_1")
    wait_for(lambda: all(state(f"{array}_{i}") in TERMINAL for i in range(3)) and state(merge) in TERMINAL,
             180, "the array to end and the merge to be dropped", diagnostics)
    assert [state(f"{array}_{i}") for i in range(3)] == ["COMPLETED", "CANCELLED", "COMPLETED"], diagnostics()
    assert state(merge) == "CANCELLED", diagnostics()  # its afterok dependency can never be met
    assert not (out / "manifest.json").exists()
    assert not (out / "part-00001-of-00003.manifest.json").exists()  # nothing that looks finished
    assert (out / "part-00000-of-00003.manifest.json").exists() and (out / "part-00002-of-00003.manifest.json").exists()
    finished = {i: (out / f"part-{i:05d}-of-00003.manifest.json").stat() for i in (0, 2)}

    # 2. The same command again: 0 and 2 skip, 1 starts over, the merge runs after them.
    array, merge = submit()
    wait_for(lambda: state(merge) in TERMINAL, 240, "the merge job", diagnostics)
    assert state(merge) == "COMPLETED", diagnostics()
    elapsed = time.monotonic() - start
    text = logs()
    for i in (0, 2):
        now = (out / f"part-{i:05d}-of-00003.manifest.json").stat()
        assert (now.st_ino, now.st_mtime_ns) == (finished[i].st_ino, finished[i].st_mtime_ns)
        assert f"part-{i:05d}-of-00003.manifest.json is complete: nothing to do" in text, text
    assert re.search(r"--resume: removed \d+ file\(s\) of an unfinished run, starting part-00001-of-00003", text), text

    # 3. Exactly the documents of one process: none lost, none twice, the held-out ones apart.
    for name in ("manifest.json", "valid-manifest.json"):
        merged, single = load_manifest(str(out / name)), load_manifest(str(reference / name))
        assert (merged.total_docs, merged.total_tokens) == (single.total_docs, single.total_tokens), name
        assert {s.path.split(".")[0] for s in merged.shards} <= {f"part-{i:05d}-of-00003" for i in range(3)}
        assert documents(str(out / name)) == documents(str(reference / name)), name
    listed = {s.path for s in load_manifest(str(out / "manifest.json")).shards}
    on_disk = {n for n in os.listdir(out) if n.endswith(".tar") and ".valid-" not in n}
    assert listed == on_disk  # the killed run's leftovers are gone
    print(f"array of 3 (one killed), resubmitted, merged: {elapsed:.0f} s")
