"""The DSA indexer's scores of a tile of queries against a chunk of keys, in Triton.

    q [b, m, H, d], w [b, m, H] (fp32, scales folded in), k [b, n, d] at positions k_start..k_start+n-1
    -> scores [b, m, n] fp32 = sum_h w[h] · relu(q[h] · k), -inf where the key is after the query
    or, with q_start [b, m] (packed documents: where each query's document starts), before it

One program per (BLOCK_M queries, BLOCK_N keys, batch) loops over the heads, so the [m, H, n]
per-head scores of the torch form are never stored: only the summed tile is. The running top-k of
model/modules/dsa_blockwise.py (`indexer_topk`, which calls this as its `scores_fn`) takes each
tile's top-k with torch.topk and merges it with the best so far, so a block of queries holds
[BLOCK, k + KEY_CHUNK] scores, never [S, S].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.kernels import interpreted


@triton.jit
def _index_scores(Q, W, K, QPOS, QSTART, OUT, k_start, M, N, H, D,
                  s_qb, s_qm, s_qh, s_wb, s_wm, s_kb, s_kn, s_ob, s_om, s_sb, s_sm,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT: tl.constexpr, PREC: tl.constexpr):
    pm, pn, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mm, mn, md = offs_m < M, offs_n < N, offs_d < D
    k = tl.load(K + b * s_kb + offs_n[:, None] * s_kn + offs_d[None, :], mask=mn[:, None] & md[None, :],
                other=0.0).to(DOT)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for h in range(0, H):
        q = tl.load(Q + b * s_qb + offs_m[:, None] * s_qm + h * s_qh + offs_d[None, :],
                    mask=mm[:, None] & md[None, :], other=0.0).to(DOT)
        wh = tl.load(W + b * s_wb + offs_m * s_wm + h, mask=mm, other=0.0)
        acc += tl.maximum(tl.dot(q, tl.trans(k), input_precision=PREC), 0.0) * wh[:, None]
    q_pos = tl.load(QPOS + offs_m, mask=mm, other=0)
    q_doc = tl.load(QSTART + b * s_sb + offs_m * s_sm, mask=mm, other=0)
    k_pos = (k_start + offs_n)[None, :]
    acc = tl.where((k_pos > q_pos[:, None]) | (k_pos < q_doc[:, None]), float("-inf"), acc)
    tl.store(OUT + b * s_ob + offs_m[:, None] * s_om + offs_n[None, :], acc, mask=mm[:, None] & mn[None, :])


def indexer_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor,
                   k_start: int, q_start: torch.Tensor | None = None) -> torch.Tensor:
    q, k = q.contiguous(), k.contiguous()
    w = w.float().contiguous()
    q_pos = q_pos.contiguous()
    b, m, heads, d = q.shape
    # one document per sequence: every start 0 (a stride-0 view, nothing allocated per query)
    q_start = (torch.zeros(1, 1, dtype=q_pos.dtype, device=q.device).expand(b, m) if q_start is None
               else q_start.to(q_pos.dtype))
    n = k.shape[1]
    out = torch.empty(b, m, n, dtype=torch.float32, device=q.device)
    bf16 = q.dtype == torch.bfloat16 and k.dtype == torch.bfloat16 and not interpreted()
    block_m, block_n = 32, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), b)
    _index_scores[grid](q, w, k, q_pos, q_start, out, k_start, m, n, heads, d,
                        q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), k.stride(0), k.stride(1),
                        out.stride(0), out.stride(1), q_start.stride(0), q_start.stride(1),
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
                        DOT=tl.bfloat16 if bf16 else tl.float32, PREC="tf32" if bf16 else "ieee")
    return out
