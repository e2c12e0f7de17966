"""Kimi Delta Attention (model/modules/kda.py, kda_rule.py) against transformers' GLM-5.3-Flash: the
chunked rule equals the token-by-token recurrence (fp64) and transformers' own functions (which run in
fp32), and the whole layer equals `Glm5NextTextLinearAttention` forward and backward, every weight's
gradient compared through the name map. The fused flash-linear-attention backend is compared with the
torch reference on a GPU."""

from __future__ import annotations

import pytest
import torch

from model.flash_hf_mapping import kda_from_hf, kda_to_hf
from model.modules.kda import KimiDeltaAttention, fla_available, resolve_backend
from model.modules.kda_rule import chunk_kda, recurrent_kda
from tests.flash_reference import TINY, assert_fp32_close, grads, hf_text_config, randomized

FP32 = dict(rtol=1e-5, atol=1e-6)


def rule_inputs(b=2, t=37, h=3, dk=10, dv=7, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype).to(device)  # noqa: E731
    g = -5 * torch.sigmoid(r(b, t, h, dk))  # the lower-bounded gate's range
    return [x.requires_grad_() for x in (r(b, t, h, dk), r(b, t, h, dk), r(b, t, h, dv), g,
                                         torch.sigmoid(r(b, t, h)))]


def test_chunked_rule_is_the_recurrence_forward_and_backward():
    inputs = rule_inputs()
    out_r, state_r = recurrent_kda(*inputs)
    (out_r.sum() + state_r.square().sum()).backward()
    want = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    out_c, state_c = chunk_kda(*inputs, chunk_size=16)  # 37 tokens: two full chunks and a ragged one
    (out_c.sum() + state_c.square().sum()).backward()
    torch.testing.assert_close(out_c, out_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state_c, state_r, rtol=1e-10, atol=1e-10)
    for x, w in zip(inputs, want):
        torch.testing.assert_close(x.grad, w, rtol=1e-9, atol=1e-10)


def test_rule_equals_transformers_functions():
    from transformers.models.glm5_next import modeling_glm5_next as hf

    q, k, v, g, beta = (x.detach() for x in rule_inputs())
    ours, state = chunk_kda(q, k, v, g, beta, chunk_size=16)
    for fn, extra in ((hf.chunk_kimi_delta_attention, dict(chunk_size=16)), (hf.recurrent_kimi_delta_attention, {})):
        theirs, their_state = fn(q, k, v, g=g, beta=beta, initial_state=None, output_final_state=True,
                                 use_qk_l2norm_in_kernel=True, **extra)
        torch.testing.assert_close(ours, theirs, **FP32)
        torch.testing.assert_close(state, their_state.to(state.dtype), **FP32)


@pytest.mark.parametrize("lower_bound", [-5.0, None], ids=["bounded-gate", "softplus-gate"])
def test_layer_equals_transformers_forward_and_backward(lower_bound):
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextLinearAttention

    cfg = TINY.replace(linear_lower_bound=lower_bound)
    theirs = randomized(Glm5NextTextLinearAttention(hf_text_config(cfg), layer_idx=0), seed=1)
    ours = KimiDeltaAttention(cfg, backend="torch", chunk_size=8).double()
    ours.load_state_dict(kda_from_hf(theirs.state_dict()))
    x = torch.randn(2, 21, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ours(x_ours.transpose(0, 1)).transpose(0, 1)  # ours is [s, b, h]
    want = theirs(x_theirs)
    torch.testing.assert_close(out, want, **FP32)
    out.square().sum().backward()
    want.square().sum().backward()
    assert_fp32_close(x_ours.grad, x_theirs.grad)
    mapped = kda_to_hf(grads(ours), cfg.linear_qkv_dim, cfg.linear_num_heads)
    assert mapped.keys() == grads(theirs).keys()
    for name, g in grads(theirs).items():
        assert_fp32_close(mapped[name], g, name)


def test_packed_documents_run_as_separate_sequences():
    """Documents packed into a row (doc_starts, as model/modules/documents.py gives them) neither share
    the delta rule's state nor the short convolution's window: the same outputs and gradients as each
    document run alone."""
    torch.manual_seed(3)
    layer = randomized(KimiDeltaAttention(TINY, backend="torch", chunk_size=4), seed=3)
    x = torch.randn(23, 2, TINY.hidden_size, dtype=torch.float64, requires_grad=True)  # [s, b, h]
    starts = torch.tensor([[0] * 7 + [7] * 9 + [16] * 7, [0] * 23])
    packed = layer(x, doc_starts=starts)
    packed.square().sum().backward()
    want_grads = {n: g.clone() for n, g in grads(layer).items()}
    layer.zero_grad()
    x_alone = x.detach().clone().requires_grad_()
    pieces = [(0, 0, 7), (0, 7, 16), (0, 16, 23), (1, 0, 23)]
    alone = [layer(x_alone[a:e, row:row + 1]) for row, a, e in pieces]
    sum(o.square().sum() for o in alone).backward()
    for (row, a, e), o in zip(pieces, alone):
        torch.testing.assert_close(packed[a:e, row:row + 1], o, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x_alone.grad, rtol=1e-9, atol=1e-11)
    for name, g in grads(layer).items():
        torch.testing.assert_close(want_grads[name], g, rtol=1e-9, atol=1e-11, msg=name)


def test_backend_seam_refuses_by_name():
    with pytest.raises(ValueError, match="kda_backend='cuda'"):
        resolve_backend("cuda", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    if not fla_available():
        with pytest.raises(ValueError, match="flash-linear-attention"):
            resolve_backend("fla", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not fla_available(), reason="needs CUDA and fla")
def test_fla_kernel_equals_torch_reference_on_gpu():
    from model.modules.kda import delta_rule

    inputs = rule_inputs(t=200, h=4, dk=64, dv=64, dtype=torch.float32, device="cuda")
    theirs = delta_rule(*inputs, backend="fla")
    theirs.sum().backward()
    fla_grads = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    ours = delta_rule(*inputs, backend="torch")
    ours.sum().backward()
    torch.testing.assert_close(theirs, ours, rtol=2e-3, atol=2e-3)
    for got, want in zip(fla_grads, (x.grad for x in inputs)):
        torch.testing.assert_close(got, want, rtol=5e-3, atol=5e-3)
    starts = torch.tensor([[0] * 70 + [70] * 130, [0] * 200], device="cuda")  # packed documents: fla's cu_seqlens
    torch.testing.assert_close(delta_rule(*inputs, backend="fla", doc_starts=starts),
                               delta_rule(*inputs, backend="torch", doc_starts=starts), rtol=2e-3, atol=2e-3)
