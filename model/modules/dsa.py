"""DeepSeek Sparse Attention (DSA) for GLM-5: the lightning indexer and the sparse core attention.

Plugs into megatron-core's `MLASelfAttention` as its `core_attention` (the spec in model/specs.py),
which calls it with the full-head query/key/value plus `x` (the layer input) and `qr` (the
normalized query latent). Parameter names match megatron-core's DSA so checkpoints interoperate.

    indexer:  q_I = wq_b(qr) per head, k_I = LayerNorm(wk(x)), RoPE on the last rope dims,
              score(t, s) = sum_h w_h(t) * relu(q_I[t,h] . k_I[s]),  w = weights_proj(x) * H^-1/2 * d^-1/2
              top-k over causal keys
    attention: softmax(q.k * scale) over the selected keys only (torch reference path)
    training: the indexer learns from KL(attention || softmax(index scores)) on detached inputs,
              attached to the output by megatron's DSAIndexerLossAutoScaler.

This torch path materializes [b, s, s] scores: it is the reference and the CPU path.
"""

from __future__ import annotations

import torch

from megatron.core.models.common.embeddings import RotaryEmbedding, apply_rotary_pos_emb
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.experimental_attention_variant.dsa import (
    DSAIndexerLossAutoScaler,
    DSAIndexerLossLoggingHelper,
    compute_dsa_indexer_loss,
    unfused_dsa_fn,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from model.modules.norms import LayerNorm

INDEXER_NORM_EPS = 1e-6  # HF's indexer k_norm (MAPPING.md D2)


class GLMIndexer(MegatronModule):
    """The DSA lightning indexer, without megatron-core's Hadamard rotation (HF has none)."""

    def __init__(self, config, submodules, pg_collection):
        super().__init__(config=config)
        self.pg_collection = pg_collection
        self.n_heads = config.dsa_indexer_n_heads
        self.head_dim = config.dsa_indexer_head_dim
        self.rope_dim = config.qk_pos_emb_head_dim
        self.topk = config.dsa_indexer_topk
        self.rotary_pos_emb = RotaryEmbedding(
            self.rope_dim, rotary_percent=1.0, rotary_base=config.rotary_base, cp_group=pg_collection.cp,
            use_cpu_initialization=config.use_cpu_initialization,
        )
        linear = dict(config=config, init_method=config.init_method, bias=False, skip_bias_add=False,
                      skip_weight_param_allocation=False, parallel_mode="duplicated")
        self.linear_wq_b = build_module(submodules.linear_wq_b, config.q_lora_rank,
                                        self.n_heads * self.head_dim, **linear)
        self.linear_wk = build_module(submodules.linear_wk, config.hidden_size, self.head_dim, **linear)
        # The indexer's inputs are gathered over the sequence, so its norm is not in the SP region.
        norm_config = _without_sequence_parallel(config)
        self.k_norm = LayerNorm(norm_config, self.head_dim, eps=INDEXER_NORM_EPS)
        self.linear_weights_proj = build_module(submodules.linear_weights_proj, config.hidden_size,
                                                self.n_heads, **linear)

    def _rope(self, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        nope, pe = torch.split(t, [self.head_dim - self.rope_dim, self.rope_dim], dim=-1)
        pe = apply_rotary_pos_emb(pe, freqs, config=self.config, cp_group=self.pg_collection.cp)
        return torch.cat([nope, pe], dim=-1)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, mask: torch.Tensor):
        """x [s, b, hidden], qr [s, b, q_lora] (sequence-parallel shards if SP), mask [s, s] or
        [b, s, s] additive fp32. Returns index scores [b, s, s] (fp32) and top-k indices [b, s, k]."""
        if self.config.sequence_parallel and self.pg_collection.tp.size() > 1:
            x = gather_from_sequence_parallel_region(x, group=self.pg_collection.tp)
            qr = gather_from_sequence_parallel_region(qr, group=self.pg_collection.tp)
        s, b, _ = x.shape
        freqs = self.rotary_pos_emb(s)

        q, _ = self.linear_wq_b(qr)
        q = self._rope(q.view(s, b, self.n_heads, self.head_dim), freqs)
        k, _ = self.linear_wk(x)
        k = self._rope(self.k_norm(k).view(s, b, 1, self.head_dim), freqs).view(s, b, self.head_dim)
        w, _ = self.linear_weights_proj(x)
        w = w.float() * (self.n_heads ** -0.5) * (self.head_dim ** -0.5)

        # relu(a*c) = c*relu(a) for c>0, so scaling w instead of q.k is the same score as HF's.
        scores = torch.einsum("sbhd,tbd->bsht", q.float(), k.float()).relu_()
        scores = torch.einsum("bsht,sbh->bst", scores, w) + mask
        topk = scores.topk(min(self.topk, s), dim=-1).indices
        return scores, topk


def _without_sequence_parallel(config):
    import copy

    c = copy.copy(config)
    c.sequence_parallel = False
    return c


class GLMSparseAttention(MegatronModule):
    """DSA core attention: the indexer picks top-k keys per query, attention runs over them."""

    def __init__(self, config, submodules, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout=None, softmax_scale=None, k_channels=None,
                 v_channels=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.indexer = build_module(submodules.indexer, config=config, pg_collection=pg_collection)
        # megatron's Attention base builds core attention once without k_channels before MLA
        # rebuilds it with them; the first instance is discarded.
        if softmax_scale is None:
            softmax_scale = (k_channels or config.kv_channels) ** -0.5
        self.softmax_scale = softmax_scale
        # The MTP layer's layer_number is num_layers + 1: size the loss tracker for it.
        self.tracked_layers = config.num_layers + (config.mtp_num_layers or 0)

    def forward(self, query, key, value, attention_mask, x, qr, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            raise NotImplementedError("DSA does not support packed sequences")
        sq, skv = query.shape[0], key.shape[0]
        causal = torch.full((sq, skv), float("-inf"), device=query.device).triu_(1)
        index_scores, topk = self.indexer(x.detach(), qr.detach(), causal)
        output = unfused_dsa_fn(query, key, value, topk, self.softmax_scale)

        coeff = self.config.dsa_indexer_loss_coeff or 0.0
        if self.training and torch.is_grad_enabled() and coeff > 0:
            loss = compute_dsa_indexer_loss(
                index_scores, topk, query.detach(), key.detach(), self.softmax_scale, coeff,
                self.config.dsa_indexer_use_sparse_loss, self.indexer.pg_collection,
            )
            DSAIndexerLossLoggingHelper.save_loss_to_tracker(loss, self.layer_number, self.tracked_layers)
            output = DSAIndexerLossAutoScaler.apply(output, loss)
        return output
