"""Checkpoints of an older stack load into today's model (pretrain/checkpoint/upgrade.py): weights saved by
megatron-core 0.16.1 (tests/fixtures/make_mcore016_checkpoint.py, GPTModel's key layout) give the same logits
and resume training where that run left off (docs/COMPAT.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.inprocess import train_here

MCORE016 = Path(__file__).resolve().parents[2] / "fixtures" / "mcore016"  # tests/fixtures/make_mcore016_checkpoint.py
TINY = ["--preset", "tiny", "--mock-data", "--global-batch-size", "2", "--micro-batch-size", "1",
        "--seq-length", "64", "--lr", "3e-3"]


def test_megatron_core_016_checkpoint_gives_the_same_logits():
    """Weights saved by the 0.16.1 stack (commit 5a77f20): the main logits on the same tokens are unchanged."""
    from megatron.core import parallel_state

    from tools.lib.hf_verify import build_our_model, main_logits
    from tests.helpers import one_rank_gloo_world

    want = torch.load(MCORE016 / "logits.pt", weights_only=True)
    with one_rank_gloo_world():
        try:
            chunk, cfg = build_our_model(str(MCORE016 / "checkpoint"), None)
            with torch.no_grad():
                got = main_logits(chunk, want["tokens"])[..., : cfg.vocab_size]
        finally:
            parallel_state.destroy_model_parallel()
    assert torch.allclose(got, want["logits"], rtol=0, atol=1e-5), (got - want["logits"]).abs().max()


@pytest.mark.integration
def test_megatron_core_016_checkpoint_resumes_training():
    """Optimizer state, data position and RNG of the 0.16.1 checkpoint: the resumed step 3 computes the
    0.16.1 run's losses (its forward only reads what was loaded); step 4 follows 0.19.2's MTP weighting
    (64/63 on the MTP gradients at sequence 64, docs/COMPAT.md), so it agrees to 1e-3."""
    want = json.loads((MCORE016 / "resumed.json").read_text())
    got = train_here([*TINY, "--train-iters", "4", "--load", str(MCORE016 / "checkpoint"),
                      "--override-opt_param-scheduler"])
    for tag in ("lm loss", "mtp loss"):
        assert got[tag][3] == pytest.approx(want[tag]["3"], rel=1e-5), tag
        assert got[tag][4] == pytest.approx(want[tag]["4"], rel=1e-3), tag
