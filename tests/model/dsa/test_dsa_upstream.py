"""--dsa-kernel-backend: our blockwise path and megatron-core's own modules with its torch path ("none")
build the same parameters and compute the same thing -- the whole tiny model's logits, LM + indexer
losses and every weight's gradient, in the dense warm-up (top-k = every key) and the sparse stage with
the sparse KL. GPU-only backends are refused on CPU by name (tests/model/dsa/test_dsa_backends.py runs them on
a GPU). Context parallelism: tests/parallel/test_context_parallel.py (layout `cp2-upstream-none`)."""

from __future__ import annotations

import pytest
import torch

from tests.parallel.test_mcore_exchange import SEQ, ours, randomize, tiny, world  # noqa: F401 (fixture)


def step(model, backend, topk, sparse_loss):
    """One forward-backward in training mode, the indexer loss weighted as pretrain/recipe.py does
    (ours: a mean over queries, times the tokens; megatron-core's: already a sum)."""
    from megatron.core.transformer.experimental_attention_variant.dsa import (
        DSAIndexerLossAutoScaler,
        DSAIndexerLossLoggingHelper,
    )

    from pretrain.step import reset_loss_trackers

    cfg = model.config
    cfg.dsa_indexer_loss_coeff, cfg.dsa_indexer_use_sparse_loss = 1.0, sparse_loss
    for n, m in model.named_modules():
        if n.endswith("self_attention.core_attention"):
            m.index_topk = topk
    reset_loss_trackers()  # megatron-core's process-global trackers: this step's values only, none left by others
    DSAIndexerLossAutoScaler.set_loss_scale(torch.tensor(1.0 if backend == "none" else float(SEQ)))
    tokens = torch.randint(0, tiny().vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    model.train()
    model.zero_grad()
    loss = model(input_ids=tokens, position_ids=torch.arange(SEQ)[None], attention_mask=None, labels=tokens)
    loss.sum().backward()
    # every layer's and the MTP layer's (megatron-core files the latter under layer 1, ours after the decoder)
    kl = DSAIndexerLossLoggingHelper.tracker["values"].sum()
    kl = kl / SEQ if backend == "none" else kl  # megatron-core's per-token sum -> a mean, as ours
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), kl, grads


@pytest.mark.parametrize("stage", ["dense-warmup", "sparse"])
def test_blockwise_equals_megatron_core_per_weight(world, stage):  # noqa: F811
    topk, sparse_loss = (10**6, False) if stage == "dense-warmup" else (16, True)
    mine, theirs = ours("blockwise"), ours("none")
    randomize(mine, seed=2)
    theirs.load_state_dict(mine.state_dict())
    assert type(theirs.decoder.layers[0].self_attention).__name__ == "AbsorbedMLASelfAttention"
    want_loss, want_kl, want = step(theirs, "none", topk, sparse_loss)
    got_loss, got_kl, got = step(mine, "blockwise", topk, sparse_loss)
    assert torch.allclose(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert want_kl > 0 and torch.allclose(got_kl, want_kl, rtol=1e-4), (got_kl, want_kl)
    assert sorted(got) == sorted(want)
    for name, g in want.items():
        err = (got[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
    assert any("indexer" in n for n in want)  # the indexer is trained by its KL on both


@pytest.mark.parametrize("backend", ["tilelang", "cudnn", "triton"])
def test_gpu_backends_are_refused_without_a_gpu_by_name(backend, monkeypatch):
    from model.mcore_config import ModelOptions, check_dsa_kernel_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=f"--dsa-kernel-backend {backend}"):
        check_dsa_kernel_backend(ModelOptions(dsa_kernel_backend=backend))


def test_upstream_backend_limits_are_named():
    from model.mcore_config import ModelOptions, check_dsa_kernel_backend
    from parallel.dims import ParallelDims

    with pytest.raises(ValueError, match="--sequence-parallel"):
        check_dsa_kernel_backend(ModelOptions(dsa_kernel_backend="none"), ParallelDims(world_size=2, tp=2))
    with pytest.raises(ValueError, match="--dsa-indexer-loss-coeff"):
        check_dsa_kernel_backend(ModelOptions(dsa_kernel_backend="none", dsa_indexer_loss_coeff=0.1),
                                 ParallelDims(world_size=2, tp=2, sequence_parallel=True))
    assert check_dsa_kernel_backend(ModelOptions()) == "blockwise"  # this CPU's default
