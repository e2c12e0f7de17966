"""DSA in O(S·k) memory: the indexer's top-k, the sparse MLA attention and the indexer's KL loss,
each over blocks of queries, never a [S, S] (or [heads, S, S]) buffer. The torch path here runs on
CPU and is the reference of the Triton kernels (model/kernels/), which replace its two hot loops
on CUDA.

Layout: batch first. Queries [b, sq, ...] sit at global positions `q_pos` [sq] (0..S-1 without
context parallelism); keys [b, S, ...] are every position in global order.

Sparse attention in the absorbed MLA form: every query head h scores the shared 576-number latent
row kv[s] = [c(s) | k_pe(s)] of each position with q_h = [W_uk,h^T q_nope,h | q_pe,h], and returns
the softmax-weighted sum of the latents c(s) (the caller applies W_uv,h afterwards). The top-k rows
are gathered once per query and shared by all heads. Top-k indices are int64 [b, sq, k]; -1 marks a
slot with no causal key (a query at position t < k has only t + 1 keys).

Packed documents (model/modules/documents.py): `q_start` [b, sq], the row where each query's document
starts, limits its keys to q_start..q_pos -- in the top-k (so the sparse attention, which reads only
the top-k, stays inside the document too) and in the KL loss. None: every earlier key.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# fp32 elements one block of queries may hold in its largest temporary (64 MiB): sets the block
# size from the shapes, so memory per block is bounded whatever S is.
BLOCK_BUDGET = 1 << 24
KEY_CHUNK = 4096  # keys scored at once by the indexer's running top-k
KL_EPS = 1e-10  # megatron-core's INDEXER_LOSS_EPS


def query_block(per_query: int) -> int:
    """Queries per block so that a block's temporaries of `per_query` elements each fit the budget."""
    return max(1, BLOCK_BUDGET // max(per_query, 1))


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# --- indexer --------------------------------------------------------------------------------------
def index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """sum_h w_h · relu(q_h · k): q [b, m, H, d], w [b, m, H], k [b, n, d] -> [b, m, n] fp32."""
    s = torch.einsum("bqhd,bkd->bqhk", q.float(), k.float()).relu_()
    return torch.einsum("bqhk,bqh->bqk", s, w.float())


def index_scores_at(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Index scores at the selected keys only: idx [b, m, kk] -> [b, m, kk], -inf where idx < 0."""
    kg = _gather_rows(k, idx)  # [b, m, kk, d]
    s = torch.einsum("bqhd,bqkd->bqhk", q.float(), kg.float()).relu_()
    s = torch.einsum("bqhk,bqh->bqk", s, w.float())
    return s.masked_fill(idx < 0, float("-inf"))


def _hidden_keys(q_pos: torch.Tensor, k_start: int, n: int, q_start: torch.Tensor | None) -> torch.Tensor:
    """Bool [1 or b, m, n]: keys k_start..k_start+n-1 after the query or before its document."""
    k_pos = torch.arange(k_start, k_start + n, device=q_pos.device).view(1, 1, -1)
    hidden = k_pos > q_pos.view(1, -1, 1)
    return hidden if q_start is None else hidden | (k_pos < q_start.unsqueeze(-1))


def _causal_fill(scores: torch.Tensor, q_pos: torch.Tensor, k_start: int,
                 q_start: torch.Tensor | None = None) -> torch.Tensor:
    """-inf in scores [b, m, n] where the key is after the query or before its document."""
    return scores.masked_fill_(_hidden_keys(q_pos, k_start, scores.shape[-1], q_start), float("-inf"))


def indexer_topk(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, topk: int,
                 scores_fn=None, q_start: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k causal keys per query by index score, blocks of queries with a running top-k over key
    chunks: q [b, sq, H, d], w [b, sq, H], k [b, S, d] -> int64 [b, sq, min(topk, S)] (-1: none),
    best first; ties go to the lower key position. With `q_start` [b, sq] only keys of the query's
    document (module docstring).
    `scores_fn(q, w, k, q_pos, k_start, q_start)` gives one tile's masked scores (a kernel)."""
    b, sq, heads, _ = q.shape
    n_keys = k.shape[1]
    kk = min(topk, n_keys)
    scores_fn = scores_fn or (lambda q_, w_, k_, p_, s_, d_: _causal_fill(index_scores(q_, w_, k_), p_, s_, d_))
    key_chunk = KEY_CHUNK
    out = torch.empty(b, sq, kk, dtype=torch.long, device=q.device)
    block = query_block(heads * key_chunk + 4 * (kk + key_chunk))  # tile, then the merge's sort
    with torch.no_grad():
        for blk in _blocks(sq, block):
            pos = q_pos[blk]
            last_key = int(pos.max()) + 1  # later keys are all masked: skip them
            starts = None if q_start is None else q_start[:, blk]
            first_key = 0 if starts is None else int(starts.min())  # and keys of earlier documents
            vals = torch.full((b, pos.numel(), kk), float("-inf"), device=q.device)
            idx = torch.full((b, pos.numel(), kk), -1, dtype=torch.long, device=q.device)
            for start in range(first_key, last_key, key_chunk):
                end = min(start + key_chunk, last_key)
                tile = scores_fn(q[:, blk], w[:, blk], k[:, start:end], pos, start, starts)
                keys = torch.arange(start, end, device=q.device).expand(b, pos.numel(), -1)
                # A stable sort, not topk: equal scores (relu's zeros are common) keep the lower
                # key, so the choice does not depend on how keys are chunked or queries placed.
                vals, pick = torch.cat([vals, tile], -1).sort(dim=-1, descending=True, stable=True)
                vals, pick = vals[..., :kk], pick[..., :kk]
                idx = torch.cat([idx, keys], -1).gather(-1, pick)
            out[:, blk] = idx.masked_fill_(vals == float("-inf"), -1)
    return out


# --- sparse MLA attention -------------------------------------------------------------------------
def _gather_rows(kv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """kv [b, S, D], idx [b, m, kk] -> [b, m, kk, D] (slot -1 reads row 0; callers mask it)."""
    b, m, kk = idx.shape
    return kv.reshape(-1, kv.shape[-1]).index_select(0, _flat_rows(idx, kv.shape[1])).view(b, m, kk, -1)


def _flat_rows(idx: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Row numbers of idx [b, m, kk] in kv viewed as [b * S, D] (whole-row copies, not gather)."""
    offsets = torch.arange(idx.shape[0], device=idx.device).view(-1, 1, 1) * n_keys
    return (idx.clamp(min=0) + offsets).reshape(-1)


def _probs(q, kv_rows, idx, scale, lse=None):
    """Softmax over the selected keys, fp32: q [b, m, h, D], kv_rows [b, m, kk, D] -> p, lse."""
    s = torch.einsum("bqhd,bqkd->bqhk", q.float(), kv_rows.float()) * scale
    s.masked_fill_((idx < 0).unsqueeze(2), float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse.unsqueeze(-1)), lse


class SparseMLA(torch.autograd.Function):
    """out[b, t, h] = sum_j softmax_j(q[b,t,h] · kv[b, idx[b,t,j]] · scale) · kv[b, idx[b,t,j], :dv].
    Saves q, kv, idx, out and the log-sum-exp; the backward recomputes the probabilities per block."""

    @staticmethod
    def forward(ctx, q, kv, idx, scale: float, dv: int):
        b, sq, heads, dim = q.shape
        kk = idx.shape[-1]
        out = q.new_empty(b, sq, heads, dv)
        lse = torch.empty(b, sq, heads, dtype=torch.float32, device=q.device)
        for blk in _blocks(sq, query_block(kk * (dim + 2 * heads))):
            rows = _gather_rows(kv, idx[:, blk])
            p, lse[:, blk] = _probs(q[:, blk], rows, idx[:, blk], scale)
            out[:, blk] = torch.einsum("bqhk,bqkc->bqhc", p, rows[..., :dv].float()).to(out.dtype)
        ctx.save_for_backward(q, kv, idx, out, lse)
        ctx.scale, ctx.dv = scale, dv
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, idx, out, lse = ctx.saved_tensors
        scale, dv = ctx.scale, ctx.dv
        b, sq, heads, dim = q.shape
        kk = idx.shape[-1]
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        for blk in _blocks(sq, query_block(kk * (2 * dim + 3 * heads))):
            rows = _gather_rows(kv, idx[:, blk])
            p, _ = _probs(q[:, blk], rows, idx[:, blk], scale, lse[:, blk])
            do = dout[:, blk].float()
            delta = (do * out[:, blk].float()).sum(-1, keepdim=True)  # [b, m, h, 1]
            dp = torch.einsum("bqhc,bqkc->bqhk", do, rows[..., :dv].float())
            ds = p * (dp - delta) * scale
            dq[:, blk] = torch.einsum("bqhk,bqkd->bqhd", ds, rows.float())
            drows = torch.einsum("bqhk,bqhd->bqkd", ds, q[:, blk].float())
            drows[..., :dv] += torch.einsum("bqhk,bqhc->bqkc", p, do)
            # slot -1 has p = ds = 0: its zero rows may land on row 0 harmlessly
            dkv.view(-1, dim).index_add_(0, _flat_rows(idx[:, blk], kv.shape[1]), drows.reshape(-1, dim))
        return dq.to(q.dtype), dkv.to(kv.dtype), None, None, None


def sparse_mla_torch(q, kv, idx, scale: float, dv: int) -> torch.Tensor:
    return SparseMLA.apply(q, kv, idx, scale, dv)


# --- indexer KL loss ------------------------------------------------------------------------------
def _kl_block(q_i, w, k_i, pos, idx, q, kv, scale, sparse, tp_group, starts=None):
    """Sum over this block's queries of KL(attention || softmax(index scores)) (module docstring of
    model/modules/dsa.py). Attention comes from detached q, kv: only the index scores carry grad."""
    with torch.no_grad():
        if sparse:
            rows = _gather_rows(kv, idx)
            s = torch.einsum("bqhd,bqkd->bqhk", q.float(), rows.float()) * scale
            s.masked_fill_((idx < 0).unsqueeze(2), float("-inf"))
        else:
            s = torch.einsum("bqhd,bkd->bqhk", q.float(), kv.float()) * scale
            # the top-k's mask (causal, inside the document): the dense warm-up's loss stays in it too
            s.masked_fill_(_hidden_keys(pos, 0, kv.shape[1], starts).unsqueeze(2), float("-inf"))
        attention = torch.softmax(s, dim=-1).sum(dim=2)  # [b, m, keys]
        if tp_group is not None and tp_group.size() > 1:
            torch.distributed.all_reduce(attention, group=tp_group)
        attention = attention / attention.sum(dim=-1, keepdim=True).clamp_min(KL_EPS)
        log_attention = torch.log(attention.clamp_min(KL_EPS))
    if sparse:
        z = index_scores_at(q_i, w, k_i, idx)
    else:
        z = _causal_fill(index_scores(q_i, w, k_i), pos, 0, starts)
    # megatron-core 0.19.2's KL (dsa_indexer_loss.py): the exact log-softmax of the index scores
    # (log(p + eps) would flatten the loss and its gradient where p < eps); masked keys add nothing.
    terms = attention * (log_attention - torch.log_softmax(z, dim=-1))
    return terms.masked_fill(torch.isinf(z), 0.0).sum()


def indexer_kl_loss_blockwise(q_i, w, k_i, q_pos, idx, q, kv, scale: float, loss_coeff: float,
                              sparse: bool, tp_group=None, q_start=None) -> torch.Tensor:
    """The indexer's KL loss, mean over queries times `loss_coeff`, one checkpointed block of
    queries at a time (its backward recomputes the block: nothing [S, S] is ever kept).
    Indexer q_i [b, sq, H, d], w [b, sq, H], k_i [b, S, d]; attention q [b, sq, h, D], kv [b, S, D]."""
    b, sq, heads, _ = q.shape
    index_heads, index_dim = q_i.shape[2], q_i.shape[3]
    if sparse:  # the gathered latent and indexer-key rows, then per-head scores, of each query
        per_query = idx.shape[-1] * (kv.shape[-1] + index_dim + 2 * heads + 2 * index_heads + 4)
    else:
        per_query = kv.shape[1] * (2 * heads + 2 * index_heads + 4)
    block = query_block(per_query)
    total = None
    for blk in _blocks(sq, block):
        part = checkpoint(_kl_block, q_i[:, blk], w[:, blk], k_i, q_pos[blk], idx[:, blk], q[:, blk], kv,
                          scale, sparse, tp_group, None if q_start is None else q_start[:, blk], use_reentrant=False)
        total = part if total is None else total + part
    return total / (b * sq) * loss_coeff
