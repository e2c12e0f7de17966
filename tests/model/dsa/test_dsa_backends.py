"""On one GPU: each CUDA backend of --dsa-kernel-backend against megatron-core's torch path ("none") on
the same weights -- the model's logits, LM and indexer losses and every weight's gradient.

    python -m pytest -q -m gpu tests/model/dsa/test_dsa_backends.py          (one H200: well under 2 minutes)

tilelang and cudnn are megatron-core's (its fused kernels, with its modules); triton is ours (with
ours). A backend whose package is not importable is skipped by name. One layer with GLM-5's
attention shapes (16 heads here, the latent 512 + 64, the indexer's 32 x 128, top-512 of 1024 keys:
the shapes the fused kernels accept without falling back to torch), in bf16, so the tolerances are
bf16's; a near-tie in the indexer may flip a key, which moves a few rows more than rounding does.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.helpers import one_rank_gloo_world

pytestmark = pytest.mark.gpu
PACKAGE = {"tilelang": "tilelang", "cudnn": "cudnn", "triton": "triton"}
SEQ, TOPK = 1024, 512


def config():
    from model.presets import get_preset

    return get_preset("tiny").replace(
        hidden_size=512, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=256, kv_lora_rank=512,
        qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, index_n_heads=32, index_head_dim=128,
        index_topk=TOPK, num_hidden_layers=1, first_k_dense_replace=1, num_nextn_predict_layers=0)


def build(backend):
    from model.builder import build_model
    from model.mcore_config import ModelOptions, to_transformer_config

    cfg = config()
    options = ModelOptions(dsa_kernel_backend=backend, params_dtype=torch.bfloat16, bf16=True)
    (chunk,) = build_model(cfg, to_transformer_config(cfg, options), use_te=False)
    return chunk.cuda()


def step(model, upstream):
    from megatron.core.transformer.experimental_attention_variant.dsa import (
        DSAIndexerLossAutoScaler,
        DSAIndexerLossLoggingHelper,
    )

    from pretrain.step import reset_loss_trackers

    model.config.dsa_indexer_loss_coeff, model.config.dsa_indexer_use_sparse_loss = 1.0, True
    reset_loss_trackers()  # megatron-core's process-global trackers: this step's values only, none left by others
    DSAIndexerLossAutoScaler.set_loss_scale(torch.tensor(1.0 if upstream else float(SEQ), device="cuda"))
    tokens = torch.randint(0, config().vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0)).cuda()
    model.train()
    model.zero_grad()
    loss = model(input_ids=tokens, position_ids=torch.arange(SEQ, device="cuda")[None], attention_mask=None,
                 labels=tokens)
    loss.float().sum().backward()
    kl = DSAIndexerLossLoggingHelper.tracker["values"].sum() / (SEQ if upstream else 1)
    return loss.detach().float(), kl, {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["tilelang", "cudnn", "triton"])
def test_cuda_backend_equals_megatron_cores_torch_path(backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if importlib.util.find_spec(PACKAGE[backend]) is None:
        pytest.skip(f"--dsa-kernel-backend {backend}: the package {PACKAGE[backend]} is not importable here")
    from megatron.core import parallel_state

    from parallel import runtime as rt
    from parallel.dims import ParallelDims

    with one_rank_gloo_world():
        rt.init_model_parallel(ParallelDims(world_size=1), 1, 0)
        try:
            reference, candidate = build("none"), build(backend)
            g = torch.Generator(device="cuda").manual_seed(0)
            with torch.no_grad():
                for name, t in reference.state_dict().items():
                    if torch.is_tensor(t) and t.is_floating_point():
                        t.copy_(torch.randn(t.shape, generator=g, device="cuda") * 0.05
                                + (1.0 if "norm.weight" in name else 0.0))
            candidate.load_state_dict(reference.state_dict())
            want_loss, want_kl, want = step(reference, upstream=True)
            got_loss, got_kl, got = step(candidate, upstream=backend != "triton")
        finally:
            parallel_state.destroy_model_parallel()
    assert torch.allclose(got_loss, want_loss, rtol=2e-2, atol=2e-2)
    assert torch.allclose(got_kl, want_kl, rtol=5e-2), (got_kl, want_kl)
    assert sorted(got) == sorted(want)
    for name, g in want.items():
        err = (got[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 5e-2, f"{backend}: {name}: relative error {err:.2e}"
