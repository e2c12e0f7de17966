"""GLM-5.3-Flash's DSA indexer over pooled keys, as transformers' `Glm5NextTextIndexer` selects, for a
causal sequence without padding (training's case; packed documents come with the layer).

The indexer scores groups of `index_kpool` consecutive keys instead of single keys:
    k_I = LayerNorm(wk(x));  pool key = sum over the group's tokens of softmax_tokens(gate(x) + position
    bias) * k_I  (a learned per-channel weighted mean; only complete groups are pooled)
    score(t, p) = sum_h w_h(t) relu(q_I[t, h] . pool_key[p] / sqrt(d)),  w = weights_proj(x) / sqrt(H)
Query t may pick a pool only when the pool's last token is at or before t; it takes the best
index_topk / index_kpool pools, expanded back to their tokens, plus (index_kpool_always_select_tail)
the tokens of its own incomplete group. No RoPE anywhere: GLM-5.3-Flash's MLA and indexer are NoPE.
The result is token indices [b, s, index_topk (+ index_kpool - 1)], -1 where nothing is selected,
which `selection_mask` turns into the sparse attention's mask.

Parameter names are megatron-core's DSAIndexer's (linear_wq_b, linear_wk, k_norm, linear_weights_proj)
plus the pooling's `kpool_gate` and `kpool_position_bias`; megatron-core 0.19.2 has no pooled indexer.
"""

from __future__ import annotations

import torch
from torch import nn

from model.modules.documents import document_offsets


def pool_keys(keys: torch.Tensor, gate_scores: torch.Tensor, position_bias: torch.Tensor, kpool: int) -> torch.Tensor:
    """[b, s, d] keys and gate scores -> [b, s // kpool, d] keys of the complete pools."""
    b, s, d = keys.shape
    pools = s // kpool
    grouped = keys[:, : pools * kpool].unflatten(1, (pools, kpool))
    logits = gate_scores[:, : pools * kpool].unflatten(1, (pools, kpool)).float() + position_bias.float()
    return (logits.softmax(dim=2).to(grouped.dtype) * grouped).sum(2)


def select_tokens(scores: torch.Tensor, topk: int, kpool: int, always_select_tail: bool) -> torch.Tensor:
    """[b, s, pools] index scores -> token indices [b, s, width] (-1: none), causal, the tail appended."""
    b, s, pools = scores.shape
    device = scores.device
    t = torch.arange(s, device=device)
    pool_end = torch.arange(pools, device=device) * kpool + kpool - 1
    visible = pool_end[None, :] <= t[:, None]  # [s, pools]
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    chosen = scores.topk(min(topk // kpool, pools), dim=-1).indices  # [b, s, k]
    chosen_visible = visible.expand(b, s, pools).gather(-1, chosen)
    tokens = chosen[..., None] * kpool + torch.arange(kpool, device=device)  # [b, s, k, kpool]
    tokens = tokens.masked_fill(~chosen_visible[..., None], -1).flatten(-2)
    width = topk
    if always_select_tail and kpool > 1:
        tail_count = (t + 1) % kpool
        offsets = torch.arange(kpool - 1, device=device)
        tail = (t + 1 - tail_count)[:, None] + offsets
        tail = tail.masked_fill(offsets[None, :] >= tail_count[:, None], -1)
        tokens = torch.cat([tokens, tail.expand(b, s, kpool - 1)], dim=-1)
        width += kpool - 1
    return nn.functional.pad(tokens, (0, width - tokens.shape[-1]), value=-1)[..., :width]


def selection_mask(indices: torch.Tensor, kv_length: int) -> torch.Tensor:
    """Token indices [b, s, w] (-1: none) -> the attention mask [b, s, kv_length], True where selected."""
    mask = torch.zeros(*indices.shape[:-1], kv_length + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, torch.where(indices < 0, kv_length, indices), True)
    return mask[..., :kv_length]


class PooledKeyIndexer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, d = cfg.index_n_heads, cfg.index_head_dim
        self.n_heads, self.head_dim = h, d
        self.topk, self.kpool, self.always_select_tail = cfg.index_topk, cfg.index_kpool, cfg.index_kpool_always_select_tail
        self.linear_wq_b = nn.Linear(cfg.q_lora_rank, h * d, bias=False)
        self.linear_wk = nn.Linear(cfg.hidden_size, d, bias=False)
        self.k_norm = nn.LayerNorm(d, eps=1e-6)
        self.linear_weights_proj = nn.Linear(cfg.hidden_size, h, bias=False)
        self.kpool_gate = nn.Parameter(torch.ones(d, cfg.hidden_size))
        self.kpool_position_bias = nn.Parameter(torch.zeros(cfg.index_kpool, d))

    def scores(self, x: torch.Tensor, qr: torch.Tensor) -> torch.Tensor:
        """x [b, s, hidden], qr [b, s, q_lora_rank] (the normalised query latent) -> [b, s, pools] in fp32."""
        q = self.linear_wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim)).float()
        keys = pool_keys(self.k_norm(self.linear_wk(x)), x @ self.kpool_gate.t(), self.kpool_position_bias,
                         self.kpool).float()
        per_head = torch.relu(torch.einsum("bshd,bpd->bshp", q, keys) * self.head_dim**-0.5)
        weights = self.linear_weights_proj(x).float() * self.n_heads**-0.5
        return torch.einsum("bsh,bshp->bsp", weights, per_head)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, qr: torch.Tensor, doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        """megatron's [s, b, ...] inputs -> token indices (rows of the sequence) [b, s, width], -1 where none.
        `doc_starts` [b, s] (model/modules/documents.py): each packed document is indexed alone, its
        pools counted from its first token (as transformers counts them from the first unpadded one)."""
        x, qr = x.transpose(0, 1), qr.transpose(0, 1)
        if doc_starts is None:
            return select_tokens(self.scores(x, qr), self.topk, self.kpool, self.always_select_tail)
        b, s = doc_starts.shape
        bounds = document_offsets(doc_starts).tolist()
        out = []
        for a, e in zip(bounds[:-1], bounds[1:]):
            row, start = divmod(a, s)
            piece = (slice(row, row + 1), slice(start, start + e - a))
            chosen = select_tokens(self.scores(x[piece], qr[piece]), self.topk, self.kpool, self.always_select_tail)
            out.append(torch.where(chosen >= 0, chosen + start, chosen))
        return torch.cat(out, dim=1).view(b, s, -1)
