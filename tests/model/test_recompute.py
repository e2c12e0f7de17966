"""Activation recompute (Megatron-LM's --recompute-granularity / --recompute-method /
--recompute-num-layers / --recompute-modules) trains exactly like no recompute: the same losses and
grad norm at every iteration and the same gradient of every weight at step 1, against the
single-process reference of tests/grad_check.py (indexer KL loss on, MTP, MoE with expert bias)."""

import pytest

from tests import grad_check
from tests.conftest import gpu_only
from tests.helpers import TE

VARIANTS = {
    # megatron's checkpointed core attention passes no x/qr: DSA needs both (model/modules/attention_recompute.py)
    "selective": ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "layernorm",
                  "mlp", "moe", "shared_experts"],
    "full-uniform": ["--recompute-granularity", "full"],  # the production recipe's choice (uniform, 1 layer)
    "full-block-2": ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"],
}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(VARIANTS))
def test_recompute_matches_no_recompute(name, grad_reference, tmp_path):
    want_scalars, want_grads = grad_reference
    scalars, ranks = grad_check.train(tmp_path, 1, [*grad_check.RUN, *VARIANTS[name]])
    grad_check.assert_same_scalars(name, want_scalars, scalars)
    grad_check.assert_same_gradients(name, want_grads, ranks)


@pytest.mark.parametrize("argv,message", [
    (["--recompute-method", "block"], "--recompute-method block needs --recompute-granularity full"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "2"],
     "--recompute-num-layers 2 needs --recompute-granularity full"),
    (["--recompute-granularity", "full", "--recompute-num-layers", "9"], "--recompute-num-layers 9 must be between 1"),
    (["--recompute-granularity", "full", "--recompute-modules", "mlp"], "--recompute-modules needs"),
    (["--recompute-granularity", "selective", "--recompute-modules", "attn"], "--recompute-modules attn: choose"),
])
def test_bad_recompute_flags_are_refused(argv, message, capsys):
    from pretrain.config.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--mock-data", *argv], world_size=1)
    assert message in capsys.readouterr().err


@gpu_only
@pytest.mark.parametrize("variant", ["selective", "full-uniform"])
@pytest.mark.integration
def test_recompute_with_te_matches_no_recompute(variant, te_reference, tmp_path):
    scalars, ranks = grad_check.train(tmp_path, 1, [*grad_check.RUN, *TE, *VARIANTS[variant]])
    grad_check.assert_same_scalars(variant, te_reference[0], scalars)
    grad_check.assert_same_gradients(variant, te_reference[1][0], ranks, tol=1e-3)
