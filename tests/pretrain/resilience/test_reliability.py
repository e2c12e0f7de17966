"""Faults injected for real: SIGKILL, a crash inside a checkpoint write, a full or unusable disk,
non-finite losses, loss spikes, a rank that stops answering. Each test fails if its guarantee breaks. Every
run of a process is the real torchrun command (`warm=False`): how the processes end is part of what is tested."""

import signal
import subprocess
import sys
import time

import psutil
import pytest

from pretrain.checkpoint.checkpointer import TRACKER, latest_iteration
from tests.helpers import ROOT, child_env, free_port, one_rank_gloo_world, read_scalars, torchrun
from tests.inprocess import train_here, trainer

from tests.conftest import TINY_RUN as BASE


@pytest.fixture(scope="module")
def uninterrupted(tiny_reference):
    return tiny_reference["lm loss"]


def start(nproc, args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "launch" / "pretrain.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**child_env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(proc, text, timeout=300):
    deadline = time.time() + timeout
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
        if time.time() > deadline:
            break
    raise AssertionError(f"never saw {text!r}:\n{''.join(seen[-30:])}")


@pytest.mark.parametrize("nproc, victim", [(1, "all"), (2, "rank1")])
@pytest.mark.integration
def test_sigkill_after_a_checkpoint_loses_only_work_since_it(tmp_path, uninterrupted, nproc, victim):
    ck = tmp_path / "ck"
    extra = ["--expert-model-parallel-size", "2"] if nproc == 2 else []
    proc = start(nproc, [*BASE, *extra, "--save", str(ck), "--save-interval", "4"])
    wait_for(proc, "iteration        5/")
    workers = sorted(psutil.Process(proc.pid).children(recursive=True), key=lambda p: p.pid)
    if victim == "all":  # the whole job, launcher and workers
        for p in [psutil.Process(proc.pid), *workers]:
            p.send_signal(signal.SIGKILL)
    else:  # one worker dies; torchrun then takes the others down
        workers[-1].send_signal(signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert latest_iteration(ck) == 4
    torchrun(nproc, [*BASE, *extra, "--load", str(ck), "--tensorboard-dir", str(tmp_path / "tb")], warm=False)
    resumed = read_scalars(tmp_path / "tb")["lm loss"]
    assert sorted(resumed) == [5, 6, 7, 8]
    for it in resumed:
        assert resumed[it] == pytest.approx(uninterrupted[it], rel=1e-5), it


@pytest.mark.integration
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, uninterrupted):
    ck = tmp_path / "ck"
    proc = torchrun(1, [*BASE, "--save", str(ck), "--save-interval", "4"], check=False, warm=False,
                    env={"GLM5_INJECT_FAULT": "kill@save-shards-8"})  # SIGKILL inside the second save
    assert proc.returncode != 0
    assert latest_iteration(ck) == 4 and (ck / "iter_0000008.partial").exists()
    assert not (ck / "iter_0000008").exists()
    resumed = train_here([*BASE, "--load", str(ck), "--exit-interval", "5"])  # in this process: no launch
    assert resumed["lm loss"][5] == pytest.approx(uninterrupted[5], rel=1e-5)


@pytest.mark.integration
def test_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    proc = torchrun(1, [*BASE, "--train-iters", "4", "--save", str(ck), "--save-interval", "2"], check=False,
                    warm=False,
                    env={"GLM5_INJECT_FAULT": "enospc@save-shards"})
    assert proc.returncode != 0
    assert "No space left on device" in proc.stderr and f"--save {ck}" in proc.stderr
    assert not (ck / TRACKER).exists() and not list(ck.glob("iter_*"))


@pytest.mark.integration
def test_unusable_save_dir_is_refused_before_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = torchrun(1, [*BASE, "--save", str(blocker / "ck")], check=False, warm=False)
    assert proc.returncode != 0 and f"--save {blocker / 'ck'} is not a writable directory" in proc.stderr
    assert "iteration" not in proc.stdout


def test_non_finite_steps_are_skipped_counted_and_bounded_and_spikes_logged(tmp_path, monkeypatch, capsys):
    """The trainer's own bookkeeping, in this process (the fault is a loss, not a process's end)."""
    tb, ck = tmp_path / "tb", tmp_path / "ck"
    monkeypatch.setenv("GLM5_INJECT_FAULT", "nan-loss@2,nan-loss@5,nan-loss@6")
    with one_rank_gloo_world(), trainer([*BASE, "--max-consecutive-skipped-iters", "2", "--loss-spike-factor", "0.5",
                                         "--save", str(ck), "--save-interval", "1", "--tensorboard-dir", str(tb)]) as t:
        with pytest.raises(RuntimeError, match="2 consecutive iterations"):
            t.train()
    s = read_scalars(tb)
    assert [s["skipped-iterations"][i] for i in range(1, 6)] == [0, 1, 0, 0, 1]
    assert s["skipped-iterations-total"][5] == 2 and s["lm loss"][4] == s["lm loss"][4]  # finite again
    assert latest_iteration(ck) == 5  # never saved after the stop
    assert "loss spike at iteration 3" in capsys.readouterr().out  # 2 was NaN: skipped, not a spike


@pytest.mark.integration
def test_a_rank_that_stops_answering_makes_the_others_fail_with_a_timeout(tmp_path):
    began = time.time()
    proc = torchrun(2, [*BASE, "--expert-model-parallel-size", "2", "--distributed-timeout-minutes", "0.15"],
                    check=False, warm=False, timeout=240, env={"GLM5_INJECT_FAULT": "hang@2:rank1"})
    assert proc.returncode != 0
    assert "timed out after 9s" in proc.stderr and "iteration 2" in proc.stderr
    assert time.time() - began < 200
