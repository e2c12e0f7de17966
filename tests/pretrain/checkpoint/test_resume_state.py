"""What a resume restores, by optimizer class and by flag: Adam state with torch's Adam and with
Transformer Engine's FusedAdam (plain and distributed optimizer), rank-state files read without
running pickled code, and a learning-rate schedule that differs from the checkpoint's refused unless a
flag says which wins. In-process trainers (tests/inprocess.py): one rank, a few iterations."""

from __future__ import annotations

import pytest
import torch

from pretrain.checkpoint.checkpointer import CheckpointError
from tests import grad_check
from tests.conftest import gpu_only
from tests.helpers import TE, run_logged
from tests.inprocess import one_rank, trainer  # noqa: F401 (fixture)

RUN = ["--preset", "tiny", "--mock-data", "--global-batch-size", "4", "--seq-length", "32", "--seed", "7",
       "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1", "--train-iters", "2"]


class StandInFusedAdam(torch.optim.Optimizer):
    """Transformer Engine's FusedAdam as checkpoints see it (TE needs a GPU; this is not its code):
    Adam/AdamW whose step count lives in each param group, whose per-parameter state is the moments
    (and a master copy), and whose state_dict / load_state_dict look up a dtype for every
    per-parameter state name -- any other name (torch Adam's `step`) is a KeyError, as in TE."""

    dtype_of_state = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32, "master_param": torch.float32}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True, **_):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=True))
        self.adam_w_mode = adam_w_mode

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group["params"]:
                continue
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** group["step"])).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** group["step"]))

    def _dtypes(self, states) -> None:
        for state in states:
            for name in state:
                self.dtype_of_state[name]  # KeyError: 'step', as TE's get_unscaled_state / set_scaled_state

    def state_dict(self):
        out = super().state_dict()
        self._dtypes(out["state"].values())
        return out

    def load_state_dict(self, state_dict):
        self._dtypes(state_dict["state"].values())
        super().load_state_dict(state_dict)


@pytest.fixture
def te_fused_adam(monkeypatch):
    """megatron-core as it is with Transformer Engine installed: its Adam is TE's FusedAdam."""
    import megatron.core.optimizer as mcore_optimizer
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer

    StandInFusedAdam.__module__ = "transformer_engine.pytorch.optimizers.fused_adam"
    monkeypatch.setattr(mcore_optimizer, "Adam", StandInFusedAdam)
    monkeypatch.setattr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False)
    monkeypatch.setattr(distrib_optimizer, "Adam", StandInFusedAdam)
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    monkeypatch.setattr(distrib_optimizer, "USING_TE_OPTIMIZER", True)


def _adam_state(t) -> tuple[list, list]:
    """(per-parameter state tensors, per-group step counts) of every inner optimizer, in order."""
    tensors, steps = [], []
    for opt in getattr(t.optimizer, "chained_optimizers", [t.optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            steps.append(group.get("step"))
            for p in group["params"]:
                tensors.append({k: v.clone() for k, v in inner.state[p].items()})
    return tensors, steps


@pytest.mark.parametrize("adam, engine", [("te", []), ("te", ["--use-distributed-optimizer"]),
                                          ("torch", ["--use-distributed-optimizer"])],
                         ids=["te-fused-adam", "te-fused-adam-distopt", "torch-adam-distopt"])
def test_adam_state_resumes_with_the_optimizer_class_in_use(one_rank, tmp_path, request, adam, engine):
    if adam == "te":
        request.getfixturevalue("te_fused_adam")
    ck = str(tmp_path / "ck")
    with trainer([*RUN, *engine, "--save", ck]) as first:
        first.train()
        saved_tensors, saved_steps = _adam_state(first)
    with trainer([*RUN, *engine, "--load", ck]) as resumed:
        tensors, steps = _adam_state(resumed)
    assert [sorted(s) for s in tensors] == [sorted(s) for s in saved_tensors]
    if adam == "te":  # the count is the groups', never a per-parameter entry FusedAdam cannot hold
        assert steps == saved_steps and set(steps) == {2} and all("step" not in s for s in tensors)
    else:  # torch Adam: each parameter its own count, not one tensor shared (and incremented) by all
        assert len({id(s["step"]) for s in tensors}) == len(tensors) and {float(s["step"]) for s in tensors} == {2.0}
    for got, want in zip(tensors, saved_tensors):
        for name in want:
            assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def saved(one_rank, tmp_path_factory):
    """A checkpoint of iteration 2 of RUN (--train-iters 2: its schedule has ended at --min-lr)."""
    ck = tmp_path_factory.mktemp("sched") / "ck"
    with trainer([*RUN, "--save", str(ck)]) as t:
        t.train()
    return ck


def _lr_after_load(ck, extra):
    with trainer([*RUN, "--load", str(ck), *extra]) as t:
        return t.iteration, t.optimizer.param_groups[0]["lr"]


def test_a_longer_run_is_refused_unless_a_flag_says_which_schedule_wins(saved):
    with pytest.raises(CheckpointError, match="--override-opt_param-scheduler") as refused:
        _lr_after_load(saved, ["--train-iters", "4"])
    assert "decay samples: 8 in the checkpoint, 16 now" in str(refused.value)
    # the flags win: iteration 3 of 4 is still decaying (cosine from 3e-3 to 3e-4, warm-up 1)
    iteration, lr = _lr_after_load(saved, ["--train-iters", "4", "--override-opt_param-scheduler"])
    assert iteration == 2 and 3e-4 < lr < 3e-3
    assert lr == pytest.approx(3e-4 + 0.5 * (3e-3 - 3e-4) * (1 + torch.cos(torch.tensor(torch.pi / 3)).item()))
    # the checkpoint wins: its schedule has ended
    assert _lr_after_load(saved, ["--train-iters", "4", "--use-checkpoint-opt_param-scheduler"])[1] == 3e-4
    # unchanged flags: no question to ask
    assert _lr_after_load(saved, [])[1] == 3e-4


def test_rank_state_is_read_without_running_pickled_code(saved, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(saved, ck)
    marker = tmp_path / "code-ran"
    rank_file = ck / "iter_0000002" / "rank_state" / "rank_00000.pt"
    state = torch.load(rank_file, weights_only=True)
    state["data"] = {"consumed_samples": _RunsCode(str(marker))}
    torch.save(state, rank_file)
    with pytest.raises(CheckpointError, match="rank_00000.pt holds more than tensors and plain data"):
        _lr_after_load(ck, [])
    assert not marker.exists()


class _RunsCode:
    """Unpickling this creates a file: what a checkpoint from elsewhere could do with weights_only=False."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_warmup_and_decay_count_iterations_under_a_batch_ramp():
    """--rampup-batch-size 4 4 64 grows the batch 4 -> 16 over 64 samples: --lr-warmup-iters 10 must
    end at iteration 10 (not when 10 x 16 samples are consumed, ~iteration 16) and the decay at
    --train-iters, while megatron's scheduler keeps counting samples."""
    from data.batch_ramp import BatchRamp
    from model.presets import get_preset
    from parallel.dims import ParallelDims
    from pretrain.config.train_config import TrainConfig
    from pretrain.engine.optimizer import build_scheduler

    cfg = TrainConfig(model=get_preset("tiny"), model_options=None, dims=ParallelDims(world_size=1),
                      global_batch_size=16, micro_batch_size=1, rampup_batch_size=[4, 4, 64], train_iters=40,
                      lr=1e-3, min_lr=1e-4, lr_warmup_iters=10, lr_decay_style="linear")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(opt, cfg)
    ramp = BatchRamp(4, 4, 64, 16)  # the trainer's schedule (tests/data/test_data_reader.py holds it to megatron's)
    consumed, lr, batches = 0, {}, []
    for iteration in range(1, 41):
        batches.append(ramp.size_after(consumed))
        scheduler.step(increment=batches[-1])
        consumed += batches[-1]
        lr[iteration] = opt.param_groups[0]["lr"]
    assert batches[0] == 4 and batches[-1] == 16  # the ramp happened
    assert lr[9] < lr[10] == pytest.approx(1e-3)
    assert lr[40] == pytest.approx(1e-4) and lr[39] > 1e-4


def test_both_schedule_flags_are_refused(capsys):
    from pretrain.config.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args([*RUN, "--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"])
    assert "contradict each other" in capsys.readouterr().err


@gpu_only
@pytest.mark.integration
def test_resume_is_exact_with_te_fused_adam_and_the_distributed_optimizer(tmp_path):
    common = [*grad_check.RUN, *TE, "--bf16", "--use-distributed-optimizer", "--train-iters", "6"]  # last wins
    stdout, whole = run_logged(tmp_path, "whole", common)
    assert "TE FusedAdam" in stdout, stdout[-2000:]
    ckpt = tmp_path / "ckpt"
    run_logged(tmp_path, "first", [*common, "--save", str(ckpt), "--save-interval", "3", "--exit-interval", "3"])
    _, resumed = run_logged(tmp_path, "resumed", [*common, "--load", str(ckpt)])
    for it in range(4, 7):  # GPU atomics (MoE scatter-add) leave last-bit differences only
        assert resumed["lm loss"][it] == pytest.approx(whole["lm loss"][it], rel=1e-4), it
