"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4 style) around each GLM-5.3-Flash block, as
transformers' `Glm5NextTextHyperConnection` and its decoder layer compute them.

The residual stream is `hc_mult` (N) streams, [..., N, hidden]. Before a block (attention or MLP) one
linear map of the RMS-normalised, flattened streams gives, per token,
    pre  = sigmoid(.) + eps          [N]     -> the block's input: sum_n pre_n * stream_n
    post = 2 sigmoid(.)              [N]     -> how the block's output is spread over the streams
    comb = Sinkhorn(softmax(.) + eps) [N, N]  -> how the input streams mix into the output streams
and after it: streams' = post (x) block_output + comb^T @ streams. Sinkhorn-Knopp makes comb (nearly)
doubly stochastic, so repeated mixing keeps the streams' scale. All of it is computed in fp32.
Leading dimensions are free: megatron's [s, b, N, hidden] and transformers' [b, s, N, hidden] alike.
megatron-core 0.19.2 has no hyper-connections.
"""

from __future__ import annotations

import torch
from torch import nn


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """`iters` column/row normalisations of positive [..., N, N] maps (columns first and last)."""
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def expand_streams(embeddings: torch.Tensor, n: int) -> torch.Tensor:
    """The first block's streams: the embeddings copied into each of the `n` streams."""
    return embeddings.unsqueeze(-2).expand(*embeddings.shape[:-1], n, embeddings.shape[-1]).contiguous()


def collapse_streams(streams: torch.Tensor) -> torch.Tensor:
    """After the last block, before the final norm: GLM-5.3-Flash averages the streams (unweighted)."""
    return streams.mean(-2)


class HyperConnection(nn.Module):
    def __init__(self, hidden_size: int, hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.n, self.sinkhorn_iters, self.hc_eps, self.norm_eps = hc_mult, sinkhorn_iters, hc_eps, norm_eps
        maps = (2 + hc_mult) * hc_mult  # pre, post, comb
        self.weight = nn.Parameter(torch.zeros(maps, hc_mult * hidden_size))
        self.bias = nn.Parameter(torch.zeros(maps, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32))

    @classmethod
    def of(cls, cfg) -> "HyperConnection":
        return cls(cfg.hidden_size, cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., N, hidden] -> (the block's input [..., hidden], post [..., N], comb [..., N, N])."""
        n = self.n
        dtype = torch.promote_types(streams.dtype, torch.float32)
        flat = streams.flatten(-2).to(dtype)
        flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.norm_eps)
        pre, post, comb = (flat @ self.weight.to(dtype).t()).split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.bias.to(dtype).split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale.to(dtype)
        pre = torch.sigmoid(pre * s_pre + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post * s_post + post_b)
        comb = torch.softmax((comb * s_comb + comb_b).unflatten(-1, (n, n)), dim=-1) + self.hc_eps
        comb = sinkhorn(comb, self.sinkhorn_iters, self.hc_eps)
        block_input = (pre.unsqueeze(-1) * streams).sum(-2).to(streams.dtype)
        return block_input, post, comb

    @staticmethod
    def merge(block_output: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """The streams after the block: post (x) output + comb^T @ streams (in the streams' dtype)."""
        dtype = streams.dtype
        return post.to(dtype).unsqueeze(-1) * block_output.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ streams
