"""`--dp-engine deepspeed`: DeepSpeed ZeRO-1/2 against megatron-core's distributed optimizer (same
losses and gradient norms, with clipping active and the DSA indexer loss on), exact resume from its
own checkpoints, no host tensor handed to a collective (tests/collective_devices.py), refusals of
what it cannot serve, and the implementation report."""

import sys
import types

import pytest
import torch

from pretrain.config.arguments import parse_args
from pretrain.checkpoint.checkpointer import CheckpointError
from pretrain.engine.implementations import origin
from tests import collective_devices
from tests.conftest import TINY_RUN
from tests.helpers import read_scalars, torchrun
from tests.inprocess import refused, trainer

pytest.importorskip("deepspeed")

# Gradient norms are ~0.74 here: 0.5 makes clipping change every step. The indexer loss (the recipe's
# coefficient) weighs as the main loss under both engines, per token of the global batch: scaled by
# tokens per micro-batch instead, its gradients were global-tokens/DP = 256x larger under ZeRO and the
# grad norm 0.83 instead of 0.74 at iteration 1.
RUN = [*TINY_RUN, "--train-iters", "6", "--clip-grad", "0.5", "--dsa-indexer-loss-coeff", "1"]
RTOL = 2e-3
EVAL = ["--eval-interval", "3", "--eval-iters", "1"]  # held-out evaluation through each engine


def _train(tmp_path, name, extra, env=None):
    tb = tmp_path / name
    proc = torchrun(2, [*RUN, "--tensorboard-dir", str(tb), *extra], env=env)
    return proc.stdout + proc.stderr, read_scalars(tb)


@pytest.fixture(scope="module")
def distributed_optimizer(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("distopt"), "tb",
                  ["--expert-model-parallel-size", "2", "--use-distributed-optimizer", *EVAL])[1]


def _assert_same(ours, reference, iterations):
    for tag in ("lm loss", "mtp loss", "grad-norm"):
        for it in iterations:
            assert ours[tag][it] == pytest.approx(reference[tag][it], rel=RTOL), (tag, it)


@pytest.mark.integration
def test_zero2_with_experts_matches_the_distributed_optimizer_and_resumes_exactly(
        distributed_optimizer, tmp_path):
    ck = tmp_path / "ck"
    engine = ["--expert-model-parallel-size", "2", "--dp-engine", "deepspeed", "--zero-stage", "2"]
    stdout, full = _train(tmp_path, "full", [*engine, "--save", str(ck), "--save-interval", "3"])
    assert "optimizer: DeepSpeed DeepSpeedZeroOptimizer" in stdout
    _assert_same(full, distributed_optimizer, range(1, 7))
    assert full["dsa/indexer-loss"][6] == pytest.approx(distributed_optimizer["dsa/indexer-loss"][6], rel=RTOL)
    # the expert bias moved as under megatron's engine (the load statistics it feeds back match)
    assert full["moe/load-imbalance"][6] == pytest.approx(distributed_optimizer["moe/load-imbalance"][6], rel=1e-4)

    # ZeRO state is per rank: drop iteration 6 and continue from 3 -> the same iterations 4..6. This run
    # (a load, three steps, a save) also checks that no host tensor reaches a collective.
    (ck / "latest_checkpointed_iteration.txt").write_text("3\n")
    stdout, resumed = _train(tmp_path, "resumed", [*engine, "--load", str(ck), "--save", str(tmp_path / "ck2")],
                             env=collective_devices.env())
    assert "at iteration 3" in stdout
    assert collective_devices.violations(stdout) == [] and len(collective_devices.checked_counts(stdout)) == 2
    for it in range(4, 7):
        assert resumed["lm loss"][it] == pytest.approx(full["lm loss"][it], rel=1e-6, abs=1e-6)
        assert resumed["grad-norm"][it] == pytest.approx(full["grad-norm"][it], rel=1e-6)

    # the checkpoint names its engine and layout: another one is refused before training
    with refused(CheckpointError, "resume with --dp-engine deepspeed"), trainer([*RUN, "--load", str(ck)]):
        pass


@pytest.mark.integration
def test_zero1_with_tensor_and_sequence_parallel_and_offload_matches(distributed_optimizer, tmp_path):
    # Norm and router weights see different tokens on each TP rank: their grads are summed over TP.
    _, ours = _train(tmp_path, "tp", ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                      "--dp-engine", "deepspeed", "--zero-stage", "1",
                                      "--zero-offload-optimizer", "--train-iters", "3", *EVAL])
    _assert_same(ours, distributed_optimizer, range(1, 4))
    for tag in ("lm loss validation", "mtp loss validation"):
        assert ours[tag][3] == pytest.approx(distributed_optimizer[tag][3], rel=RTOL), tag


@pytest.mark.parametrize("extra, named", [
    (["--pipeline-model-parallel-size", "2"], "--pipeline-model-parallel-size"),
    (["--use-distributed-optimizer"], "--use-distributed-optimizer"),
    (["--skip-loss-spikes", "--loss-spike-factor", "3"], "--skip-loss-spikes"),
])
def test_layouts_deepspeed_cannot_serve_are_refused(extra, named, capsys):
    with pytest.raises(SystemExit):
        parse_args([*TINY_RUN, "--dp-engine", "deepspeed", *extra], world_size=2)
    err = capsys.readouterr().err
    assert "--dp-engine deepspeed does not work with" in err and named in err


def test_offload_without_deepspeed_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args([*TINY_RUN, "--zero-offload-optimizer"])
    assert "--zero-offload-optimizer needs --dp-engine deepspeed" in capsys.readouterr().err


def test_apex_fused_rmsnorm_is_used_when_importable_and_reported(monkeypatch):
    """apex is not installable here (and never a dependency): a stand-in module with its import
    path shows that the local backend picks apex's fused RMSNorm on a GPU and the report names it."""
    class FusedRMSNorm(torch.nn.RMSNorm):
        pass

    FusedRMSNorm.__module__ = "apex.normalization.fused_layer_norm"
    normalization = types.ModuleType("apex.normalization")
    normalization.FusedRMSNorm = FusedRMSNorm
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.normalization", normalization)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from model.specs import LocalBackend

    norm_cls = LocalBackend().layer_norm()
    norm = norm_cls(types.SimpleNamespace(sequence_parallel=True), 8, eps=1e-6)
    assert isinstance(norm, FusedRMSNorm) and norm.eps == 1e-6 and norm.weight.sequence_parallel
    assert origin(norm_cls) == "apex FusedRMSNorm"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU: torch's
    assert origin(LocalBackend().layer_norm()) == "torch RMSNorm"


def test_deepspeed_param_groups_keep_megatrons_weight_decay_rule():
    """0.19 moved the "no weight decay on biases and 1-D weights" overrides out of `_get_param_groups` (None
    now means none): the DeepSpeed engine's groups must still exempt exactly the norms."""
    from pretrain.engine.deepspeed_zero import _param_groups
    from tests.helpers import one_rank_gloo_world

    module = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))
    with one_rank_gloo_world():
        groups = _param_groups(module, parse_args([*TINY_RUN, "--weight-decay", "0.1"], world_size=1))
    decay = {id(p): g["wd_mult"] for g in groups for p in g["params"]}
    assert decay[id(module[0].weight)] == 1.0
    assert decay[id(module[0].bias)] == decay[id(module[1].weight)] == decay[id(module[1].bias)] == 0.0
