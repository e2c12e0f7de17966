"""launch/slurm/pretrain.sbatch on a real SLURM cluster: one node (this machine), started by
tests/slurm_cluster.py, with the trainer as two CPU processes under srun + torchrun.

1. a run to completion with `sbatch --wait`: exit status, job log, checkpoint, TensorBoard scalars;
2. preemption: SIGUSR1 to the batch shell (what `#SBATCH --signal=B:USR1@...` sends before the time
   limit), the trainer saves and stops, the job requeues itself and the new run resumes from that
   checkpoint to the end.
Without a cluster: pretrain/signals.StopSignal, which the trainer checks after each iteration.

Skipped, with the reason, only where the daemons cannot run (not root, no apt, a daemon fails to start).
"""

from __future__ import annotations

import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.resilience.signals import StopSignal
from tests.helpers import ROOT, read_scalars
from tests.slurm_cluster import SlurmCluster, wait_for

SBATCH = ROOT / "launch" / "slurm" / "pretrain.sbatch"
TRACKER = "latest_checkpointed_iteration.txt"


# --- StopSignal on its own ----------------------------------------------------------------------------
def test_stop_signal_records_and_restores():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignal() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert stop.requested() and stop.received == signal.SIGUSR1 == stop.agreed
    assert signal.getsignal(signal.SIGUSR1) is before


def _agree(rank: int, world_size: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world_size)
    with StopSignal() as stop:
        for step in range(1, 6):
            if rank == world_size - 1 and step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # only the last rank is told
            if stop.requested():
                break
        Path(tmp, f"rank{rank}").write_text(f"{step} {int(stop.agreed or 0)} {int(stop.received or 0)}")
    dist.destroy_process_group()


@pytest.mark.integration
def test_stop_signal_all_ranks_agree(tmp_path):
    """One rank gets the signal; every rank stops after the same iteration."""
    mp.spawn(_agree, args=(2, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == [f"3 {signal.SIGTERM:d} 0",
                                                                       f"3 {signal.SIGTERM:d} {signal.SIGTERM:d}"]


# --- SLURM --------------------------------------------------------------------------------------------
# The cluster: the session fixture `slurm` (tests/conftest.py), shared with test_preprocess_slurm.py.
def job_env(cluster: SlurmCluster, **extra: str) -> dict:
    """What the job inherits through sbatch: this interpreter's bin/ (torchrun) first on PATH, 2 workers."""
    return cluster.env(
        PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", NPROC_PER_NODE="2", **extra)


def write_config(path: Path, run: Path, train_iters: int, extra: str = "") -> Path:
    path.write_text(f"""\
# tests/launch/test_slurm.py: a tiny two-process run
--preset tiny --mock-data      # synthetic batches
--train-iters {train_iters}
--save {run / 'ckpt'}
--tensorboard-dir {run / 'tb'}
{extra}
""")
    return path


def latest(run: Path) -> int | None:
    tracker = run / "ckpt" / TRACKER
    return int(tracker.read_text()) if tracker.exists() else None


def only_log(run: Path) -> str:
    logs = sorted(run.glob("*.out"))
    assert len(logs) == 1, f"expected one job log in {run}, found {logs}"
    return logs[0].read_text(errors="replace")


def check_scalars(run: Path, steps: range) -> None:
    scalars = read_scalars(run / "tb")
    assert set(scalars["lm loss"]) == set(steps), sorted(scalars["lm loss"])
    assert all(math.isfinite(v) for v in scalars["lm loss"].values())


@pytest.mark.integration
def test_sbatch_runs_to_completion(slurm, tmp_path):
    run = tmp_path
    # The config asks for 50 iterations; the flag after it on the command line wins.
    config = write_config(run / "run.args", run, train_iters=50, extra="--save-interval 2")
    start = time.monotonic()
    proc = slurm.run("sbatch", "--wait", "--job-name=glm5-basic", f"--output={run}/%x-%j.out",
                     str(SBATCH), str(config), "--train-iters", "3",
                     env=job_env(slurm), cwd=ROOT, check=False, timeout=240)
    elapsed = time.monotonic() - start
    log = "\n".join(p.read_text(errors="replace") for p in run.glob("*.out"))
    assert proc.returncode == 0, f"sbatch --wait: {proc.returncode}\n{proc.stdout}{proc.stderr}\n{log[-6000:]}"
    job_id = int(re.search(r"Submitted batch job (\d+)", proc.stdout).group(1))
    state = slurm.job_state(job_id)
    assert (state.get("JobState"), state.get("ExitCode")) == ("COMPLETED", "0:0"), state

    log = only_log(run)
    assert (run / f"glm5-basic-{job_id}.out").exists()
    assert f"job {job_id} (restart 0) on 1 node(s) x 2, rendezvous" in log, log[-3000:]
    assert "iteration        3/       3" in log, log[-3000:]
    assert f"saved checkpoint {run / 'ckpt' / 'iter_0000003'}" in log, log[-3000:]
    assert latest(run) == 3
    assert (run / "ckpt" / "iter_0000002").is_dir()  # --save-interval 2 from the config file
    check_scalars(run, range(1, 4))
    print(f"sbatch --wait of a 3-iteration run: {elapsed:.0f} s")


@pytest.mark.integration
def test_preempted_job_saves_requeues_and_resumes(slurm, tmp_path):
    run = tmp_path
    train_iters = 24
    config = write_config(run / "run.args", run, train_iters=train_iters)  # no --save-interval
    proc = slurm.run("sbatch", "--parsable", "--job-name=glm5-preempt", f"--output={run}/%x-%j.out",
                     f"--export=ALL,CONFIG={config}", str(SBATCH), env=job_env(slurm), cwd=ROOT)
    job_id = int(proc.stdout.strip().split(";")[0])
    log_path = run / f"glm5-preempt-{job_id}.out"

    def log() -> str:
        return log_path.read_text(errors="replace") if log_path.exists() else ""

    def diagnostics() -> str:
        return f"job: {slurm.job_state(job_id)}\n--- job log\n{log()[-6000:]}\n{slurm.daemon_logs()}"

    start = time.monotonic()
    wait_for(lambda: "iteration        3/" in log(), 150, "iteration 3 of the first run", diagnostics)
    # What `#SBATCH --signal=B:USR1@120` does before the time limit: SIGUSR1 to the batch shell only.
    slurm.run("scancel", "--signal=USR1", "--batch", str(job_id))

    def finished():
        state = slurm.job_state(job_id)
        return state if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                   "NODE_FAIL", "OUT_OF_MEMORY") else None

    state = wait_for(finished, 240, "the requeued job to finish", diagnostics)
    elapsed = time.monotonic() - start
    text = log()
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), diagnostics()

    # First run: the trap passed the signal on, the trainer saved at the end of its iteration, the job requeued.
    assert "SIGUSR1: asking the trainer to save a checkpoint and stop" in text, text[-6000:]
    assert "received SIGUSR1: saving a checkpoint and stopping" in text, text[-6000:]
    saved = re.search(r"saved checkpoint \S+/iter_(\d{7})\n", text)
    assert saved, text[-6000:]
    stopped_at = int(saved.group(1))
    assert 3 <= stopped_at < train_iters, f"the signal should stop the run early, at {stopped_at}"
    assert f"requeueing job {job_id}" in text, text[-6000:]
    # Second run: --load added because the --save directory has a checkpoint; it continues to the end.
    assert f"job {job_id} (restart 1)" in text, text[-6000:]
    assert f"resuming from {run / 'ckpt'} at iteration {stopped_at}" in text, text[-6000:]
    assert f"loaded checkpoint {run / 'ckpt'} at iteration {stopped_at}" in text, text[-6000:]
    resumed = text[text.index(f"job {job_id} (restart 1)"):]
    assert f"iteration {stopped_at + 1:8d}/{train_iters:8d}" in resumed, resumed[-3000:]
    assert f"iteration {stopped_at:8d}/" not in resumed, "the resumed run repeated an iteration"
    assert latest(run) == train_iters
    assert (run / "ckpt" / f"iter_{stopped_at:07d}").is_dir()
    check_scalars(run, range(1, train_iters + 1))  # both runs' event files: every iteration once
    print(f"signal at iteration >= 3, saved at {stopped_at}, requeued, finished {train_iters}: {elapsed:.0f} s")
