"""GLM-5.2's MTP objective (`--mtp-loss-type e2e_tv`, model/modules/mtp_objective.py) and the acceptance log.

- value and gradient of megatron-core's MTP loss path with e2e_tv equal an independent plain-torch
  computation of Bebop's Eq. 13 (full-vocabulary softmaxes, explicit row shifts, chains cut at the
  sequence end, at a masked label and at a document boundary), for the hidden states and the head;
- the trainer logs each depth's alpha and the expected acceptance length for cross-entropy runs too, the
  same values e2e_tv's run sees before its first step (the tap reads the same p and q), in the log line,
  TensorBoard and validation; the refusals name the flag.
The layouts (TP-sharded vocabulary, CP, PP, EP, packed documents) are in tests/pretrain/test_mtp_shared.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from model.modules import mtp_objective
from tests import grad_check
from tests.pretrain.test_mtp_shared import ACCEPTANCE, MTP3

S, B, H, V, DEPTHS = 12, 2, 8, 40, 3


class Head:
    """megatron's output layer contract: (logits [s, b, V], bias), the weight passed or its own."""

    def __init__(self, weight):
        self.weight = weight

    def __call__(self, hidden, weight=None, runtime_gather_output=None):
        return hidden @ (self.weight if weight is None else weight).t(), None


def reference_loss(hidden, weight, loss_mask, starts, factor):
    """Eq. 13 term by term: p_i at row t is the main model's distribution at row t + i (detached)."""
    rows = hidden.chunk(1 + DEPTHS)
    p = torch.softmax(rows[0] @ weight.t(), -1).detach()  # [s, b, V]
    total, value = 0, 0
    chain = torch.ones(S, B, dtype=hidden.dtype, device=hidden.device)
    valid = torch.ones(S, B, dtype=hidden.dtype, device=hidden.device)
    for j in range(1, DEPTHS + 1):
        q = torch.softmax(rows[j] @ weight.t(), -1)
        alpha = torch.zeros(S, B, dtype=hidden.dtype, device=hidden.device)
        step_valid = torch.zeros(S, B, dtype=hidden.dtype, device=hidden.device)
        for t in range(S - j):
            alpha[t] = torch.minimum(p[t + j], q[t]).sum(-1)
            step_valid[t] = loss_mask[:, t + j] * (starts[:, t + j] == starts[:, t])
        chain = chain * alpha
        valid = valid * step_valid
        mean = (chain * valid).sum() / valid.sum()
        value = value + mean / DEPTHS
        # megatron's per-token weighting: the micro-batch's tokens over this depth's
        total = total + factor / DEPTHS * loss_mask.sum() / valid.sum() * ((1 - chain) * valid).sum()
    return total, 1 - value


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_e2e_tv_value_and_gradient_equal_plain_torch(device, monkeypatch):
    monkeypatch.setattr(mtp_objective, "ROWS", 5)  # the fp32 work in blocks of rows, the last one short
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, process_mtp_loss

    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn((1 + DEPTHS) * S, B, H, generator=g, dtype=torch.float64) * 2).to(device)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(device)
    loss_mask = torch.ones(B, S, dtype=torch.float64, device=device)
    loss_mask[0, 5] = 0  # a masked label cuts the chains through it
    starts = torch.zeros(B, S, dtype=torch.int64, device=device)
    starts[1, 7:] = 7  # a second document in row 1
    config = SimpleNamespace(mtp_num_layers=DEPTHS, mtp_loss_type="e2e_tv", mtp_detach_heads=False,
                             mtp_loss_scaling_factor=0.3, calculate_per_token_loss=True)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0, device=device))
    with mtp_objective.documents(starts):
        out = mtp_objective.process_mtp_loss(
            process_mtp_loss, hidden_states=h1, labels=torch.zeros(B, S, dtype=torch.int64, device=device),
            loss_mask=loss_mask,
            output_layer=Head(w1), output_weight=None, runtime_gather_output=None, is_training=False,
            compute_language_model_loss=None, config=config)
    assert out.shape == (S, B, H)
    (out * 0).sum().backward()  # only the MTP loss's gradient: MTPLossAutoScaler hands it ones

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total, value = reference_loss(h2, w2, loss_mask, starts, 0.3)
    total.backward()
    assert 0.3 < value < 1
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-9, atol=1e-12)
    assert h1.grad[:S].abs().sum() == 0  # p carries no gradient: the main rows get none from the MTP loss


def test_vocab_parallel_overlap_backward_is_the_analytic_one(monkeypatch):
    """The custom backward equals autograd through softmax and min (no group: one shard)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 2, 30, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(7, 2, 30, generator=g, dtype=torch.float64)
    weight = torch.rand(7, 2, generator=g, dtype=torch.float64)
    monkeypatch.setattr(mtp_objective, "ROWS", 3)  # blocks of rows, the last one short
    (mtp_objective.overlap(logits, target) * weight).sum().backward()
    ref = logits.detach().clone().requires_grad_()
    (torch.minimum(torch.softmax(ref, -1), torch.softmax(target, -1)).sum(-1) * weight).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad)




@pytest.fixture(scope="module")
def ce_and_e2e():
    from tests.inprocess import train_here

    return {kind: train_here([*grad_check.RUN, *MTP3, "--mtp-loss-type", kind]) for kind in ("ce", "e2e_tv")}


@pytest.mark.integration
def test_acceptance_logged_for_both_loss_types(ce_and_e2e):
    for kind, scalars in ce_and_e2e.items():
        for tag in (*ACCEPTANCE, *(f"{t} validation" for t in ACCEPTANCE)):
            assert scalars.get(tag), f"{kind}: no {tag!r}"
        for it in scalars["mtp loss"]:
            alphas = [scalars[t][it] for t in ACCEPTANCE[:3]]
            assert all(0 < a < 1 for a in alphas)
            assert 1 < scalars["mtp_expected_acceptance_length"][it] < 4
    ce, e2e = ce_and_e2e["ce"], ce_and_e2e["e2e_tv"]
    # the first forward runs the same weights: the tap on cross-entropy's logits sees e2e_tv's alphas
    for tag in ACCEPTANCE:
        assert ce[tag][1] == pytest.approx(e2e[tag][1], rel=1e-6), tag
    # and e2e_tv's `mtp loss` is Eq. 13's value: 1 - mean_j E[prod alpha] = mean_j (1 - E[prod])
    assert ce["mtp loss"][1] > 1  # cross-entropy at init, ~log V
    assert 0 < e2e["mtp loss"][1] < 1
    assert e2e["mtp loss"][1] == pytest.approx(sum(e2e[f"mtp_{j} loss"][1] for j in (1, 2, 3)) / 3, rel=1e-6)


def test_refusals_name_the_flag():
    from model.presets import PRESETS
    from pretrain.config.arguments import build_parser, config_from_args

    PRESETS["tiny-no-mtp"] = PRESETS["tiny"].replace(num_nextn_predict_layers=0)
    try:
        for flags in (["--mtp-loss-type", "e2e_tv"], ["--mtp-detach-heads"]):
            with pytest.raises(ValueError, match=flags[0]):
                config_from_args(build_parser().parse_args(["--mock-data", "--preset", "tiny-no-mtp", *flags]), 1)
    finally:
        del PRESETS["tiny-no-mtp"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--mtp-loss-type", "kl"])


GLM52_MTP = ["--mtp-num-layers", "7", "--mtp-use-repeated-layer", "--mtp-loss-type", "e2e_tv", "--mtp-detach-heads"]


@pytest.mark.integration
def test_glm52_mtp_trains_on_real_text(text_shards):
    """GLM-5.2's settings (7 recurrent depths of one MTP layer, e2e_tv, detached heads) on real token shards:
    the objective falls and the draft's acceptance rises, every depth's alpha and the length logged."""
    from tests.inprocess import train_here

    manifest, tokenizer = text_shards
    scalars = train_here(["--preset", "tiny", "--data-path", str(manifest), "--tokenizer", tokenizer,
                          "--seq-length", "64", "--train-iters", "12", "--global-batch-size", "8",
                          "--micro-batch-size", "4", "--lr", "1e-2", "--lr-warmup-iters", "2", "--seed", "1",
                          *GLM52_MTP])
    mtp, length = scalars["mtp loss"], scalars["mtp_expected_acceptance_length"]
    first, last = min(mtp), max(mtp)
    assert mtp[last] < 0.8 * mtp[first], mtp
    assert length[last] > length[first], length
    assert all(scalars[f"mtp_{d}_acceptance_alpha"][last] > 0 for d in range(1, 8))
    assert scalars["lm loss"][last] < scalars["lm loss"][first]
    # detached heads: the MTP layer's gradients are clipped by their own norm, logged apart from grad-norm
    assert all(v > 0 for v in scalars["grad-norm/mtp"].values())


def test_glm52_recipe_counts_its_depths():
    """The GLM-5.2 recipe's last stage: 7 MTP depths' layers, head FLOPs and loss memory, e2e_tv's below
    cross-entropy's at the same depths (model/accounting.py's measured bytes per vocabulary entry)."""
    import argparse

    from model.accounting import flops_per_token, mtp_loss_bytes
    from model.presets import get_preset
    from tools.model_info import recipe_info

    recipe = "launch/recipes/glm5.2-bridge-416xh100.args"
    tv = recipe_info(recipe, argparse.ArgumentParser())
    ce = recipe_info(recipe, argparse.ArgumentParser(), ["--mtp-loss-type", "ce"])
    one = recipe_info(recipe, argparse.ArgumentParser(), ["--mtp-num-layers", "1", "--mtp-loss-type", "ce"])
    assert (tv["mtp_depths"], tv["mtp_loss_type"]) == (7, "e2e_tv") and tv["memory_gb_total_estimate"] < 80
    last = lambda info: info["stages"][-1]["activations_gb_estimate"]  # noqa: E731
    assert last(one) < last(tv) < last(ce)
    # e2e_tv saves 3 bytes per entry and depth where cross-entropy saves 4: 7 depths x 4096 x 154880 entries
    assert last(ce) - last(tv) == pytest.approx(7 * 1 * 4096 * 154880 / 2**30 - 1 * 4096 * 154880 / 2**30, rel=1e-6)
    assert mtp_loss_bytes("e2e_tv", 7) < mtp_loss_bytes("ce", 7)
    c = get_preset("glm5.2")
    assert tv["flops_per_token"] == flops_per_token(c, 4096, mtp_depths=7) > flops_per_token(c, 4096, mtp_depths=1)
