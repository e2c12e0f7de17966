"""`--optimizer muon` (pretrain/engine/muon.py on megatron-core's Muon): GLM-5's per-head split of MLA's up-projections
held to an independent Newton-Schulz computed block by block with torch, from the same gradient; split and
unsplit differ on a multi-head matrix and agree on a one-head one; a tiny run learns real text and resumes
exactly; DeepSpeed is refused by name."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import gpu_only
from tests.helpers import TE, assert_loss_falls, gpu_tiny_args, run_logged
from tests.inprocess import train_here, trainer

QUINTIC = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
           (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]  # Keller Jordan's modded-nanogpt


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's orthogonalization, written out: Frobenius-normalize, then X <- aX + (bA + cA^2)X, A = XX^T."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)
    for a, b, c in (QUINTIC * steps)[:steps]:
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return (x.T if tall else x).float()


def muon_update(g: torch.Tensor, rows: int | None, extra: float = 0.2) -> torch.Tensor:
    """The update direction of one Muon step: per head block of `rows` rows (or whole), spectral-scaled."""
    blocks = g.split(rows) if rows else [g]
    return torch.cat([newton_schulz(b) * extra * max(b.shape) ** 0.5 for b in blocks])


def one_step(p: torch.Tensor, g: torch.Tensor, rows: int | None) -> torch.Tensor:
    from pretrain.engine.muon import optimizer_class

    param = torch.nn.Parameter(p.clone())
    if rows:
        param.muon_head_rows = rows
    opt = optimizer_class()([param], lr=0.1, momentum=0.95, nesterov=False, weight_decay=0.0,
                            fp32_matmul_prec="high", extra_scale_factor=0.2)
    param.grad = g.clone()
    opt.step()
    return (p - param.detach()) / 0.1


def test_split_and_unsplit_differ_on_many_heads_and_agree_on_one():
    gen = torch.Generator().manual_seed(0)
    g, p = torch.randn(4 * 24, 16, generator=gen), torch.randn(4 * 24, 16, generator=gen)
    split, whole = one_step(p, g, 24), one_step(p, g, None)
    assert torch.allclose(split, muon_update(g, 24), atol=2e-4)
    assert torch.allclose(whole, muon_update(g, None), atol=2e-4)
    assert (split - whole).norm() > 0.1 * whole.norm()
    one_head = g[:24]
    assert torch.equal(one_step(p[:24], one_head, 24), one_step(p[:24], one_head, None))


def test_trainer_step_splits_mla_heads_as_the_independent_computation():
    """In a real training step: every MLA up-projection's update equals the block-by-block torch Newton-Schulz
    of its own momentum (the first step's: (1 - 0.95) x the gradient), and every other Muon matrix's the
    whole-matrix one."""
    argv = ["--preset", "tiny", "--mock-data", "--seq-length", "64", "--train-iters", "1", "--optimizer", "muon",
            "--muon-fp32-matmul-prec", "high", "--weight-decay", "0", "--clip-grad", "0"]
    from tests.helpers import one_rank_gloo_world

    with one_rank_gloo_world(), trainer(argv) as t:
        chunk = t.model[0].module
        params = dict(chunk.named_parameters())
        checked = {k: p for k, p in params.items() if k.endswith(("linear_q_up_proj.weight", "linear_kv_up_proj.weight",
                                                                "linear_proj.weight", "experts.local_experts.0.linear_fc1.weight"))}
        before, grads, lr = {}, {}, []
        step = t.optimizer.step

        def capture_and_step():
            before.update({k: p.detach().clone() for k, p in checked.items()})
            grads.update({k: p.main_grad.detach().clone() for k, p in checked.items()})
            lr.append(t.optimizer.param_groups[0]["lr"])
            return step()

        t.optimizer.step = capture_and_step
        t.train()
        c = chunk.config
        for k, p in checked.items():
            rows = (c.qk_head_dim + c.qk_pos_emb_head_dim if "q_up" in k
                    else c.qk_head_dim + c.v_head_dim if "kv_up" in k else None)
            assert getattr(p, "muon_head_rows", None) == rows, k
            want = muon_update(grads[k], rows)
            have = (before[k] - p.detach()) / lr[0]
            assert torch.allclose(have, want, atol=1e-4 * want.abs().max()), k


def _args(manifest, tokenizer, *extra):
    return ["--preset", "tiny", "--data-path", str(manifest), "--tokenizer", tokenizer, "--train-iters", "6",
            "--global-batch-size", "8", "--lr", "1e-2", "--optimizer", "muon", *extra]


@pytest.mark.integration
def test_learns_real_text_and_resumes_exactly(text_shards, tmp_path):
    manifest, tokenizer = text_shards
    ck = tmp_path / "ck"
    full = train_here(_args(manifest, tokenizer, "--save", str(ck), "--save-interval", "3"))["lm loss"]
    assert full[6] < full[1] - 0.3
    (ck / "latest_checkpointed_iteration.txt").write_text("3\n")
    resumed = train_here(_args(manifest, tokenizer, "--load", str(ck)))["lm loss"]
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):  # Muon's momentum buffers and Adam's moments came back exactly
        assert resumed[it] == pytest.approx(full[it], rel=1e-6), it


def test_refusals_name_the_flag():
    from pretrain.config.arguments import build_parser, config_from_args

    def error(*argv) -> str:
        with pytest.raises(ValueError) as e:
            config_from_args(build_parser().parse_args(["--mock-data", *argv]), 1)
        return str(e.value)

    assert "--optimizer muon" in error("--dp-engine", "deepspeed", "--optimizer", "muon")
    assert "needs --optimizer muon" in error("--no-muon-split-mla-heads")
    assert "--overlap-param-gather" in error("--optimizer", "muon", "--use-distributed-optimizer", "--overlap-grad-reduce",
                                             "--overlap-param-gather")
    assert "--muon-num-ns-steps 0" in error("--optimizer", "muon", "--muon-num-ns-steps", "0")


def test_resume_with_another_optimizer_is_refused_by_name(tmp_path):
    from pretrain.checkpoint.run_state import CheckpointError
    from tests.conftest import TINY_RUN
    from tests.inprocess import refused

    ck = tmp_path / "ck"
    train_here([*TINY_RUN, "--optimizer", "muon", "--exit-interval", "1", "--save", str(ck)])
    with refused(CheckpointError, "resume with --optimizer muon"), trainer([*TINY_RUN, "--load", str(ck)]):
        pass


RESHARD_RUN = ["--optimizer", "muon", "--muon-fp32-matmul-prec", "high", "--train-iters", "5", "--lr-decay-iters", "8"]


@pytest.fixture(scope="module")
def muon_one_process():
    """The uninterrupted one-process run that every resharded resume must continue as."""
    from tests.conftest import TINY_RUN

    return train_here([*TINY_RUN, *RESHARD_RUN])["lm loss"]


@pytest.mark.integration
@pytest.mark.parametrize("nproc, layout, resume", [
    (2, ["--expert-model-parallel-size", "2"], None),
    # to another multi-process layout: EP 2 x PP 2 (4 ranks) -> PP 2 (2 ranks, both experts on each)
    (4, ["--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
     (2, ["--pipeline-model-parallel-size", "2"])),
    (2, ["--use-distributed-optimizer"], None),  # megatron-core's layer-wise optimizer: each rank holds whole matrices' state
], ids=["ep2-to-1", "ep2xpp2-to-pp2", "dp2-distributed-optimizer-to-1"])
def test_muon_state_reshards(tmp_path, nproc, layout, resume, muon_one_process):
    """Saved at one layout, resumed at another (one process, or `resume`'s ranks): the momentum buffers of every
    matrix (each expert's on its rank, each stage's) and Adam's moments are resharded by global name, and the run
    continues as the one-process run does."""
    from tests.conftest import TINY_RUN
    from tests.helpers import read_scalars, torchrun

    run, full = [*TINY_RUN, *RESHARD_RUN], muon_one_process
    ck = tmp_path / "ck"
    torchrun(nproc, [*run, *layout, "--save", str(ck), "--exit-interval", "3"])
    if resume is None:
        resumed = train_here([*run, "--load", str(ck)])["lm loss"]
    else:
        torchrun(resume[0], [*run, *resume[1], "--load", str(ck), "--tensorboard-dir", str(tmp_path / "tb")])
        resumed = read_scalars(tmp_path / "tb")["lm loss"]
    assert sorted(resumed) == [4, 5]
    for it in (4, 5):
        assert resumed[it] == pytest.approx(full[it], rel=2e-3), it


@pytest.mark.integration
def test_layer_wise_distributed_optimizer_resumes_exactly_and_from_one_process(tmp_path):
    """`--use-distributed-optimizer` with Muon (megatron-core's layer-wise optimizer: each rank keeps the state
    of whole matrices): a run resumed at its own layout continues exactly, and a one-process checkpoint continues
    there as the uninterrupted run does (each matrix's state goes to the rank that owns it)."""
    from tests.conftest import TINY_RUN
    from tests.helpers import read_scalars, torchrun

    one = [*TINY_RUN, "--optimizer", "muon", "--muon-fp32-matmul-prec", "high", "--train-iters", "5",
           "--lr-decay-iters", "8"]
    run = [*one, "--use-distributed-optimizer"]
    ck = tmp_path / "ck"
    torchrun(2, [*run, "--save", str(ck), "--save-interval", "3", "--tensorboard-dir", str(tmp_path / "full")])
    full = read_scalars(tmp_path / "full")["lm loss"]
    (ck / "latest_checkpointed_iteration.txt").write_text("3\n")
    torchrun(2, [*run, "--load", str(ck), "--tensorboard-dir", str(tmp_path / "resumed")])
    resumed = read_scalars(tmp_path / "resumed")["lm loss"]
    assert sorted(resumed) == [4, 5]
    for it in (4, 5):
        assert resumed[it] == pytest.approx(full[it], rel=1e-6), it

    ck1 = tmp_path / "ck1"
    train_here([*one, "--save", str(ck1), "--exit-interval", "3"])
    torchrun(2, [*run, "--load", str(ck1), "--tensorboard-dir", str(tmp_path / "from_one")])
    from_one = read_scalars(tmp_path / "from_one")["lm loss"]
    for it in (4, 5):
        assert from_one[it] == pytest.approx(full[it], rel=2e-3), it


@gpu_only
@pytest.mark.integration
def test_muon_with_the_layer_wise_distributed_optimizer_trains_in_bf16_with_te(tmp_path, fp8_tiny_config):
    """`--optimizer muon --use-distributed-optimizer` under bf16 and TE: megatron-core's layer-wise optimizer wraps
    its optimizers itself there (the CPU suite proves the fp32 path per weight)."""
    _, scalars = run_logged(tmp_path, "muon", [*gpu_tiny_args(fp8_tiny_config), *TE, "--optimizer", "muon",
                                               "--use-distributed-optimizer"])
    assert_loss_falls(scalars["lm loss"], "muon + distributed optimizer")
