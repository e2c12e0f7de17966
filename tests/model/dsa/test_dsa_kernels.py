"""The DSA Triton kernels (model/kernels/) against the torch blockwise path they replace on CUDA.

On CPU they run under Triton's interpreter (TRITON_INTERPRET=1) at tiny shapes, with fp32 dots
(the interpreter's bf16 tl.dot is wrong; bf16 inputs are loaded and upcast in the kernel): the
sparse MLA attention forward and backward, and the indexer's score tiles and the top-k built on
them. On a GPU (`gpu` marker) the compiled kernels, bf16 dots, GLM-5's latent width.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.kernels import triton_importable  # noqa: E402
from model.modules import dsa_blockwise  # noqa: E402

needs_triton = pytest.mark.skipif(not triton_importable(), reason="triton is not installed")


def run_interpreted(case: str) -> None:
    """Run `case` of this file in a fresh process under TRITON_INTERPRET=1: Triton reads it when its
    language module is imported, so it cannot be switched on inside this (pytest's) process."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, case], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{case} under the interpreter:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def indexer_inputs(b, seq, heads, dim, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    # positive weights and mostly positive q.k: no exact ties (relu's zeros) for top-k to break
    return (torch.randn(b, seq, heads, dim, generator=g, device=device) + 1,
            torch.rand(b, seq, heads, generator=g, device=device) + 0.1,
            torch.randn(b, seq, dim, generator=g, device=device) + 1)


def attention_inputs(b, seq, heads, dv, dr, dtype, device="cpu", seed=1):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, seq, heads, dv + dr, generator=g, device=device).to(dtype).requires_grad_()
    kv = torch.randn(b, seq, dv + dr, generator=g, device=device).to(dtype).requires_grad_()
    return q, kv, torch.randn(b, seq, heads, dv, generator=g, device=device).to(dtype)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def compare_sparse_mla(kernel, q, kv, idx, probe, scale, dv, tol):
    want = dsa_blockwise.sparse_mla_torch(q, kv, idx, scale, dv)
    got = kernel(q, kv, idx, scale, dv)
    assert rel(got, want) < tol, f"forward off by {rel(got, want):.1e}"
    want_dq, want_dkv = torch.autograd.grad(want, [q, kv], probe)
    got_dq, got_dkv = torch.autograd.grad(got, [q, kv], probe)
    assert rel(got_dq, want_dq) < tol, f"dq off by {rel(got_dq, want_dq):.1e}"
    assert rel(got_dkv, want_dkv) < tol, f"dkv off by {rel(got_dkv, want_dkv):.1e}"


def interpreted_sparse_mla() -> None:
    from model.kernels.sparse_mla import sparse_mla

    seq, topk, dv, dr = 12, 8, 16, 8  # early queries have fewer than 8 keys: -1 slots
    idx = dsa_blockwise.indexer_topk(*indexer_inputs(1, seq, 2, 16), torch.arange(seq), topk)
    assert (idx < 0).any()
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        q, kv, probe = attention_inputs(1, seq, 3, dv, dr, dtype)
        compare_sparse_mla(sparse_mla, q, kv, idx, probe, 0.25, dv, tol)


def interpreted_indexer() -> None:
    from model.kernels.indexer import indexer_scores

    dsa_blockwise.KEY_CHUNK = 24  # two key chunks: the running top-k merges them
    seq, cp_positions = 40, torch.cat([torch.arange(0, 10), torch.arange(30, 40)])  # a CP rank's queries
    q, w, k = indexer_inputs(1, seq, 2, 16)
    q, w = q[:, cp_positions], w[:, cp_positions]
    tile = indexer_scores(q, w, k[:, 8:40], cp_positions, 8)
    want = dsa_blockwise._causal_fill(dsa_blockwise.index_scores(q, w, k[:, 8:40]), cp_positions, 8)
    assert torch.equal(tile.isinf(), want.isinf())
    assert torch.allclose(tile.nan_to_num(0, 0, 0), want.nan_to_num(0, 0, 0), rtol=1e-5, atol=1e-5)
    got = dsa_blockwise.indexer_topk(q, w, k, cp_positions, 6, scores_fn=indexer_scores)
    assert torch.equal(got, dsa_blockwise.indexer_topk(q, w, k, cp_positions, 6))


@needs_triton
@pytest.mark.integration
def test_kernels_read_no_global_that_the_compiler_refuses():
    """Compiled Triton (not its interpreter) refuses a module global inside a @triton.jit function unless
    it is a `tl.constexpr` (found on an H200: a plain float constant broke every CUDA run)."""
    import importlib
    import types

    import triton
    import triton.language as tl

    for name in ("model.kernels.sparse_mla", "model.kernels.indexer"):
        module = importlib.import_module(name)
        kernels = [v for v in vars(module).values() if isinstance(v, triton.runtime.JITFunction)]
        assert kernels, name
        for kernel in kernels:
            for ref in kernel.fn.__code__.co_names:
                value = vars(module).get(ref)
                allowed = (value is None or isinstance(value, (types.ModuleType, tl.constexpr, triton.runtime.JITFunction)))
                assert allowed, f"{name}.{kernel.fn.__name__} reads the global {ref} = {value!r}: make it a tl.constexpr"


@needs_triton
@pytest.mark.integration
def test_sparse_mla_kernel_matches_torch_interpreted():
    """Forward and backward, fp32 and bf16 inputs (upcast in the kernel), -1 slots included."""
    run_interpreted("interpreted_sparse_mla")


@needs_triton
@pytest.mark.integration
def test_indexer_kernel_scores_and_topk_match_torch_interpreted():
    """Score tiles at a CP rank's positions (causal -inf where they belong) and the running top-k."""
    run_interpreted("interpreted_indexer")


# --- on a GPU: the compiled kernels, bf16 dots, GLM-5's latent (512 + 64) ----------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_sparse_mla_kernel_matches_torch_on_gpu(dtype, tol):
    from model.kernels.sparse_mla import sparse_mla

    seq, topk, heads = 512, 128, 32
    idx = dsa_blockwise.indexer_topk(*indexer_inputs(2, seq, 8, 128, "cuda"),
                                     torch.arange(seq, device="cuda"), topk)
    q, kv, probe = attention_inputs(2, seq, heads, 512, 64, dtype, "cuda")
    compare_sparse_mla(sparse_mla, q, kv, idx, probe, (192 + 64) ** -0.5, 512, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_triton
def test_indexer_kernel_matches_torch_on_gpu():
    from model.kernels import triton_usable
    from model.kernels.indexer import indexer_scores

    assert triton_usable(torch.device("cuda"))  # so the DSA path resolves to the kernels
    seq = 1024
    q, w, k = (t.to(torch.bfloat16) for t in indexer_inputs(2, seq, 32, 128, "cuda"))
    pos = torch.arange(seq, device="cuda")
    tile = indexer_scores(q, w, k, pos, 0)
    want = dsa_blockwise._causal_fill(dsa_blockwise.index_scores(q, w, k), pos, 0)
    assert torch.equal(tile.isinf(), want.isinf())
    finite = ~want.isinf()
    assert rel(tile[finite], want[finite]) < 1e-3
    got = dsa_blockwise.indexer_topk(q, w, k, pos, 256, scores_fn=indexer_scores)
    ref = dsa_blockwise.indexer_topk(q, w, k, pos, 256)
    # summation order may swap near-ties: nearly all selections agree (-1 slots in column 0)
    def chosen(idx):
        return torch.zeros(*idx.shape[:2], seq + 1, device="cuda").scatter_(-1, idx + 1, 1.0)

    overlap = (chosen(got) * chosen(ref)).sum() / chosen(ref).sum()
    assert overlap > 0.99


if __name__ == "__main__":
    globals()[sys.argv[1]]()
