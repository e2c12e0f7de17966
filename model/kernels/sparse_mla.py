"""Sparse MLA attention in Triton: every head of a query attends to the same top-k latent rows.

    q [b, sq, h, DV + DR] (absorbed query: [W_uk^T q_nope | q_pe]), kv [b, S, DV + DR] (latent rows
    [c | k_pe]), idx [b, sq, k] (-1: no key) -> out [b, sq, h, DV] = softmax(q · kv[idx] · scale) @ c[idx]

One program per (query, batch, block of heads): it walks the query's top-k in chunks of BLOCK_K,
gathers those rows once for all its heads, and keeps an online softmax (running max, sum,
accumulator), as FlashAttention does over contiguous keys. The forward saves the log-sum-exp; the
backward recomputes the probabilities from it, accumulates dq in registers and adds each chunk's
dkv rows to an fp32 buffer with atomics (rows are shared by many queries). The torch reference is
`SparseMLA` in model/modules/dsa_blockwise.py (tests/model/dsa/test_dsa_kernels.py compares them).

Dots run in `DOT` (bf16 for bf16 inputs on the GPU, fp32 otherwise and under TRITON_INTERPRET=1,
whose bf16 tl.dot is wrong), accumulating in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.kernels import interpreted

NEG_BIG = tl.constexpr(-1.0e30)  # the running max starts finite: a chunk of masked slots then gives p = 0, not NaN


@triton.jit
def _sparse_mla_fwd(Q, KV, IDX, O, LSE, scale,
                    s_qb, s_qs, s_qh, s_kb, s_ks, s_ib, s_is, s_ob, s_os, s_oh, s_lb, s_ls,
                    H, K, DV: tl.constexpr, DR: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
                    DOT: tl.constexpr, PREC: tl.constexpr):
    t, b, hb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_v, offs_r = tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_DR)
    mh, mv, mr = offs_h < H, offs_v < DV, offs_r < DR
    q_rows = Q + b * s_qb + t * s_qs + offs_h[:, None] * s_qh
    q_lat = tl.load(q_rows + offs_v[None, :], mask=mh[:, None] & mv[None, :], other=0.0).to(DOT)
    q_pe = tl.load(q_rows + DV + offs_r[None, :], mask=mh[:, None] & mr[None, :], other=0.0).to(DOT)
    m_i = tl.full([BLOCK_H], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(IDX + b * s_ib + t * s_is + offs_k, mask=offs_k < K, other=-1)
        valid = idx >= 0
        rows = KV + b * s_kb + tl.where(valid, idx, 0).to(tl.int64)[:, None] * s_ks
        c = tl.load(rows + offs_v[None, :], mask=valid[:, None] & mv[None, :], other=0.0).to(DOT)
        kp = tl.load(rows + DV + offs_r[None, :], mask=valid[:, None] & mr[None, :], other=0.0).to(DOT)
        s = tl.dot(q_lat, tl.trans(c), input_precision=PREC) + tl.dot(q_pe, tl.trans(kp), input_precision=PREC)
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), c, input_precision=PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    o_rows = O + b * s_ob + t * s_os + offs_h[:, None] * s_oh + offs_v[None, :]
    tl.store(o_rows, out.to(O.dtype.element_ty), mask=mh[:, None] & mv[None, :])
    tl.store(LSE + b * s_lb + t * s_ls + offs_h, m_i + tl.log(l_i), mask=mh)


@triton.jit
def _sparse_mla_bwd(Q, KV, IDX, DO, LSE, DELTA, DQ, DKV, scale,
                    s_qb, s_qs, s_qh, s_kb, s_ks, s_ib, s_is, s_ob, s_os, s_oh, s_lb, s_ls,
                    H, K, DV: tl.constexpr, DR: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
                    DOT: tl.constexpr, PREC: tl.constexpr):
    # Q/DQ share strides (DQ is a contiguous fp32 copy of Q's shape), KV/DKV too, DO/O, LSE/DELTA.
    t, b, hb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_v, offs_r = tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_DR)
    mh, mv, mr = offs_h < H, offs_v < DV, offs_r < DR
    q_rows = Q + b * s_qb + t * s_qs + offs_h[:, None] * s_qh
    q_lat = tl.load(q_rows + offs_v[None, :], mask=mh[:, None] & mv[None, :], other=0.0).to(DOT)
    q_pe = tl.load(q_rows + DV + offs_r[None, :], mask=mh[:, None] & mr[None, :], other=0.0).to(DOT)
    do = tl.load(DO + b * s_ob + t * s_os + offs_h[:, None] * s_oh + offs_v[None, :],
                 mask=mh[:, None] & mv[None, :], other=0.0).to(DOT)
    lse = tl.load(LSE + b * s_lb + t * s_ls + offs_h, mask=mh, other=0.0)
    delta = tl.load(DELTA + b * s_lb + t * s_ls + offs_h, mask=mh, other=0.0)
    dq_lat = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    dq_pe = tl.zeros([BLOCK_H, BLOCK_DR], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(IDX + b * s_ib + t * s_is + offs_k, mask=offs_k < K, other=-1)
        valid = idx >= 0
        row_off = b * s_kb + tl.where(valid, idx, 0).to(tl.int64)[:, None] * s_ks
        c = tl.load(KV + row_off + offs_v[None, :], mask=valid[:, None] & mv[None, :], other=0.0).to(DOT)
        kp = tl.load(KV + row_off + DV + offs_r[None, :], mask=valid[:, None] & mr[None, :], other=0.0).to(DOT)
        s = tl.dot(q_lat, tl.trans(c), input_precision=PREC) + tl.dot(q_pe, tl.trans(kp), input_precision=PREC)
        p = tl.where(valid[None, :] & mh[:, None], tl.exp(s * scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(c), input_precision=PREC)
        ds = p * (dp - delta[:, None]) * scale
        dq_lat += tl.dot(ds.to(DOT), c, input_precision=PREC)
        dq_pe += tl.dot(ds.to(DOT), kp, input_precision=PREC)
        dc = tl.dot(tl.trans(ds.to(DOT)), q_lat, input_precision=PREC) + tl.dot(tl.trans(p.to(DOT)), do,
                                                                                  input_precision=PREC)
        dkp = tl.dot(tl.trans(ds.to(DOT)), q_pe, input_precision=PREC)
        tl.atomic_add(DKV + row_off + offs_v[None, :], dc, mask=valid[:, None] & mv[None, :])
        tl.atomic_add(DKV + row_off + DV + offs_r[None, :], dkp, mask=valid[:, None] & mr[None, :])
    dq_rows = DQ + b * s_qb + t * s_qs + offs_h[:, None] * s_qh
    tl.store(dq_rows + offs_v[None, :], dq_lat, mask=mh[:, None] & mv[None, :])
    tl.store(dq_rows + DV + offs_r[None, :], dq_pe, mask=mh[:, None] & mr[None, :])


def _config(q: torch.Tensor, dv: int):
    heads, dim = q.shape[2], q.shape[3]
    bf16 = q.dtype == torch.bfloat16 and not interpreted()
    return dict(
        DV=dv, DR=dim - dv,
        BLOCK_H=16 if heads <= 16 else 32,  # tl.dot needs >= 16 rows; untuned beyond that
        BLOCK_K=32 if dim > 256 else 16,
        BLOCK_DV=max(16, triton.next_power_of_2(dv)), BLOCK_DR=max(16, triton.next_power_of_2(dim - dv)),
        DOT=tl.bfloat16 if bf16 else tl.float32,
        # fp32 inputs on the GPU: full-precision dots, not TF32
        PREC="tf32" if bf16 else "ieee",
        num_warps=8 if dv >= 256 else 4,  # GLM-5's 512-wide latent: [BLOCK_K, 512] fp32 tiles in registers
    )


def _grid(q, block_h):
    b, sq, heads, _ = q.shape
    return (sq, b, triton.cdiv(heads, block_h))


class _SparseMLATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, idx, scale: float, dv: int):
        q, kv = q.contiguous(), kv.contiguous()
        idx = idx.to(torch.int32).contiguous()
        b, sq, heads, _ = q.shape
        out = q.new_empty(b, sq, heads, dv)
        lse = torch.empty(b, sq, heads, dtype=torch.float32, device=q.device)
        cfg = _config(q, dv)
        _sparse_mla_fwd[_grid(q, cfg["BLOCK_H"])](
            q, kv, idx, out, lse, scale, q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
            idx.stride(0), idx.stride(1), out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            heads, idx.shape[2], **cfg)
        ctx.save_for_backward(q, kv, idx, out, lse)
        ctx.scale, ctx.dv = scale, dv
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, idx, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1)  # [b, sq, h], same strides as lse
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        cfg = _config(q, ctx.dv)
        _sparse_mla_bwd[_grid(q, cfg["BLOCK_H"])](
            q, kv, idx, dout, lse, delta, dq, dkv, ctx.scale, q.stride(0), q.stride(1), q.stride(2),
            kv.stride(0), kv.stride(1), idx.stride(0), idx.stride(1), dout.stride(0), dout.stride(1),
            dout.stride(2), lse.stride(0), lse.stride(1), q.shape[2], idx.shape[2], **cfg)
        return dq.to(q.dtype), dkv.to(kv.dtype), None, None, None


def sparse_mla(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float, dv: int) -> torch.Tensor:
    return _SparseMLATriton.apply(q, kv, idx, scale, dv)
