"""The GPU path on the CPU bench. NCCL refuses CPU tensors: every tensor our code hands to a collective
must be on the runtime's device. tests/collective_devices.py follows where each tensor would live on a
GPU and reports the collectives that would get a host tensor; a data-parallel run with the distributed
optimizer, overlapped parameter all-gather, evaluation and saves must report none. The same run's
checkpoint must hold one step's parameters (--overlap-param-gather gathers them before a save).
The DeepSpeed engine runs under the same check in tests/pretrain/engine/test_deepspeed.py. The `gpu` tests at the end
run the same paths on NCCL."""

import subprocess
import sys

import pytest
import torch

from tests import collective_devices
from tests.fixtures_dist import single_process_group  # noqa: F401 (fixture)
from tests.helpers import ROOT, child_env, torchrun

RUN = ["--preset", "tiny", "--mock-data", "--train-iters", "2", "--global-batch-size", "8", "--seed", "1234",
       "--dsa-indexer-loss-coeff", "0.1", "--moe-aux-loss-coeff", "1e-4"]


@pytest.mark.integration
def test_the_check_catches_a_host_tensor_handed_to_a_collective():
    """The check itself: a flag made without a device in our code and all-reduced is reported,
    the same flag made on the runtime's device is not, nor one over a gloo group made on purpose."""
    probe = (
        "import os, torch, torch.distributed as dist\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(__import__('tests.helpers').helpers.free_port()))\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "dist.all_reduce(torch.ones(1))\n"
        "dist.all_reduce(torch.ones(1, device=torch.device('cpu')))\n"
        "dist.all_reduce(torch.stack([torch.ones(2).sum()]).to(torch.device('cpu')))\n"
        "dist.all_reduce(torch.ones(1), group=dist.new_group([0], backend='gloo'))\n"
        "dist.destroy_process_group()\n")
    # compiled under a file name in pretrain/: "our code" to the check
    code = f"exec(compile({probe!r}, {str(ROOT / 'pretrain' / 'probe.py')!r}, 'exec'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**child_env(), **collective_devices.env()},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = collective_devices.violations(proc.stdout + proc.stderr)
    assert found == ["all_reduce from pretrain/probe.py:4: a tensor made on the host at pretrain/probe.py:4 "
                     "(NCCL refuses CPU tensors)"], found
    assert collective_devices.checked_counts(proc.stdout) == [4]


@pytest.fixture(scope="module")
def checked_run(tmp_path_factory):
    ck = tmp_path_factory.mktemp("overlap") / "ck"
    # the save at iteration 2 comes before that iteration's evaluation (whose forward would gather)
    proc = torchrun(2, [*RUN, "--use-distributed-optimizer", "--overlap-param-gather", "--save", str(ck),
                        "--save-interval", "2", "--eval-interval", "2", "--eval-iters", "1"],
                    env=collective_devices.env())
    return proc.stdout + proc.stderr, ck


@pytest.mark.integration
def test_no_host_tensor_reaches_a_collective(checked_run):
    output, _ = checked_run
    assert collective_devices.violations(output) == []
    counts = collective_devices.checked_counts(output)
    assert len(counts) == 2 and min(counts) > 50, counts  # both ranks ran under the check


@pytest.mark.integration
def test_overlapped_param_gather_saves_the_parameters_of_one_step(checked_run, single_process_group):
    """fp32 with the distributed optimizer: each weight in the checkpoint equals its fp32 main copy.
    Without the gather before the save, half of every weight (the other rank's shard) is a step old."""
    from megatron.core.dist_checkpointing import load_plain_tensors

    _, ck = checked_run
    saved = load_plain_tensors(str(ck / "iter_0000002"))
    prefix = "optimizer.state.param."
    pairs = [(k[len(prefix):], v) for k, v in saved.items() if k.startswith(prefix) and k[len(prefix):] in saved]
    assert len(pairs) > 50
    stale = [name for name, main in pairs if not torch.equal(saved[name], main)]
    assert not stale, stale[:5]


# --- on a GPU (NCCL refuses what the check above reports): fixed by construction, run where CUDA is ----


@pytest.mark.parametrize("engine", [[], ["--dp-engine", "deepspeed", "--zero-stage", "2"]],
                         ids=["megatron", "deepspeed"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.integration
def test_first_steps_saves_evaluation_and_resume_on_nccl(tmp_path, engine):
    """Every collective of a step, a save (start-up probe included), an evaluation and a resume, on
    NCCL: with Transformer Engine installed also TE's FusedAdam through a plain bf16 optimizer."""
    if engine:
        pytest.importorskip("deepspeed")
    ck = tmp_path / "ck"
    run = [*RUN, *engine, "--bf16", "--train-iters", "3", "--save", str(ck), "--save-interval", "1",
           "--eval-interval", "2", "--eval-iters", "1"]
    torchrun(1, [*run, "--exit-interval", "2"])
    proc = torchrun(1, [*run, "--load", str(ck)])
    assert "at iteration 2" in proc.stdout and "iteration        3/" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.integration
def test_overlapped_param_gather_saves_one_step_on_two_gpus(tmp_path, single_process_group):
    from megatron.core.dist_checkpointing import load_plain_tensors

    ck = tmp_path / "ck"
    torchrun(2, [*RUN, "--use-distributed-optimizer", "--overlap-param-gather", "--save", str(ck)])
    saved = load_plain_tensors(str(ck / "iter_0000002"))
    prefix = "optimizer.state.param."
    pairs = [(k[len(prefix):], v) for k, v in saved.items() if k.startswith(prefix) and k[len(prefix):] in saved]
    stale = [name for name, main in pairs if not torch.equal(saved[name].cpu(), main.cpu())]
    assert not stale, stale[:5]
