"""DeepSeek Sparse Attention (DSA) for GLM-5: the lightning indexer and the sparse core attention.

Plugs into megatron-core's `MLASelfAttention` (our subclass in model/modules/cp_attention.py) as its
`core_attention` (the spec in model/specs.py), which calls it with the full-head query/key/value plus
`x` (the layer input) and `qr` (the normalized query latent). Parameter names match megatron-core's
DSA so checkpoints interoperate.

    indexer:  q_I = wq_b(qr) per head, k_I = LayerNorm(wk(x)), RoPE on the first rope dims,
              score(t, s) = sum_h w_h(t) * relu(q_I[t,h] . k_I[s]),  w = weights_proj(x) * H^-1/2 * d^-1/2
              top-k over causal keys
    attention: softmax(q.k * scale) over the selected keys only (torch reference path)
    training: the indexer learns from KL(attention || softmax(index scores)) on detached inputs,
              attached to the output by megatron's DSAIndexerLossAutoScaler.

Every mask is built from the queries' global positions, so the same code serves one process
(queries 0..S-1 against keys 0..S-1) and context parallelism, where a rank holds two chunks of
queries and receives every key: `LatentAttentionInputs` carries the queries' positions and the
indexer's keys gathered over the CP group (see cp_attention.py and docs/CONTEXT_PARALLEL.md).
megatron's MLA forward calls its core attention as (query, key, value, attention_mask, x=, qr=)
with what `get_query_key_value_tensors` returned and accepts no other argument; in the absorbed
form there is no value tensor (the values are made from the latent rows by the up-projection
weight), so the MLA layer returns the `LatentAttentionInputs` in the value's place and megatron
hands them on as `value`.

The MLA layer hands this module the query heads and the shared latent of every position
([c | k_pe], kv_lora_rank + rope dims, `LatentAttentionInputs`), not per-head keys and values: the
attention runs in the absorbed form (model/modules/dsa_blockwise.py) in O(S·k) memory, with Triton
kernels on CUDA (model/kernels/). `dsa_path = "dense"` selects the unfused form below, which
materializes [b, heads, s_q, s_k] scores and expands the latent to per-head keys: it is the
reference the tests and tools/bench_dsa.py compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.experimental_attention_variant import dsa as upstream_dsa
from megatron.core.transformer.experimental_attention_variant.dsa import (
    DSAIndexer,
    DSAIndexerLossAutoScaler,
    DSAIndexerLossLoggingHelper,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from model.index_share import ShareRole
from model.modules import dsa_blockwise as blockwise
from model.modules import topk_share
from model.modules.documents import document_mask, rope_freqs

@dataclass(frozen=True)
class LatentAttentionInputs:
    """What the MLA layer (cp_attention.py) hands its core attention for one forward in the value's
    place, besides the query heads and the latent rows [S, b, kv_lora_rank + rope] (the `key`)."""

    q_positions: torch.Tensor  # [s_q] global positions of this rank's queries (int64)
    # [S, b, index_head_dim] the indexer's keys at every position, global order; None on a shared layer
    index_keys: torch.Tensor | None
    kv_up_weight: torch.Tensor  # [heads * (qk_head_dim + v_head_dim), kv_lora_rank]: this TP rank's heads
    cp_group: torch.distributed.ProcessGroup | None = None  # None without context parallelism
    # packed documents (model/modules/documents.py): [b, s_q] row where each query's document starts
    # (None: one document), and the queries' RoPE positions [b, s_q] (None: q_positions)
    q_doc_starts: torch.Tensor | None = None
    rope_positions: torch.Tensor | None = None

    def contiguous(self) -> "LatentAttentionInputs":
        """megatron's MLA forward makes its `value` contiguous before the core attention."""
        return self

    @property
    def shape(self) -> torch.Size:
        """megatron-core 0.19.2's MLA reads `value.shape[-1]` before its core attention (to pad V for
        packed THD sequences without DSA, `_prepare_mla_core_attention_value`): the index keys'."""
        return self.index_keys.shape if self.index_keys is not None else torch.Size([0])


def causal_mask(q_positions: torch.Tensor, num_keys: int, q_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Additive fp32 mask [s_q, num_keys] ([b, s_q, num_keys] with packed documents' `q_starts`): -inf
    where the key's position is after the query's, or before the start of the query's document."""
    hidden = document_mask(q_positions, q_starts, num_keys)
    return torch.zeros(hidden.shape, dtype=torch.float32, device=q_positions.device).masked_fill_(hidden, float("-inf"))


class GLMIndexer(DSAIndexer):
    """megatron-core's DSA indexer (its parameters, names, layout -- RoPE dims first, as transformers --
    and its RoPE), evaluated at given global positions: the keys where each token lives (under
    sequence or context parallelism, cp_attention.py gathers them), the queries at this rank's
    positions. Built with `dsa_indexer_rotate_activation=False` (no Hadamard: HF has none, q.k is
    invariant under it) and the HF k_norm eps (model/mcore_config.py)."""

    def __init__(self, config, submodules, pg_collection):
        super().__init__(config=config, submodules=submodules, pg_collection=pg_collection)
        # Which weights see only this TP rank's slice of the sequence, so that finalize_model_grads
        # must sum their grads over TP (the `sequence_parallel` attribute). The queries' weights see
        # the gathered sequence on every TP rank (identical grads: no reduction, where megatron-core
        # averages). Under sequence parallelism each rank makes the keys of its own slice
        # (cp_attention.py), so the keys' weights are sharded.
        keys_sharded = config.sequence_parallel and pg_collection.tp.size() > 1
        for module, sharded in [(self.linear_wq_b, False), (self.linear_weights_proj, False),
                                (self.linear_wk, keys_sharded), (self.k_norm, keys_sharded)]:
            for p in module.parameters():
                p.sequence_parallel = sharded
                if hasattr(p, "average_gradients_across_tp_domain"):
                    del p.average_gradients_across_tp_domain
        self.n_heads, self.head_dim, self.rope_dim = self.index_n_heads, self.index_head_dim, self.qk_pos_emb_head_dim

    def freqs_at(self, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
        """RoPE angles at the given positions: [s] -> [s, 1, 1, rope_dim], [b, s] -> [s, b, 1, rope_dim]."""
        return rope_freqs(self.rotary_pos_emb.get_emb(seq_len), positions)

    def index_keys(self, x: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
        """k_I = RoPE(LayerNorm(wk(x))) [s, b, head_dim] for the tokens x [s, b, hidden] at `positions`
        of a sequence of `seq_len` (each token's key is made where the token lives)."""
        s, b, _ = x.shape
        k, _ = self.linear_wk(x)
        k = self.k_norm(k).view(s, b, 1, self.head_dim)
        return self._apply_rope(k, self.freqs_at(positions, seq_len), 1.0).view(s, b, self.head_dim)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, q_positions: torch.Tensor, seq_len: int):
        """The indexer's queries and head weights for the tokens of x [s, b, hidden] and qr
        [s, b, q_lora] (sequence-parallel shards if SP) at global `q_positions`.
        Returns q_I [s, b, heads, head_dim] and w [s, b, heads] (fp32, scales folded in)."""
        if self.config.sequence_parallel and self.pg_collection.tp.size() > 1:
            x = gather_from_sequence_parallel_region(x, group=self.pg_collection.tp)
            qr = gather_from_sequence_parallel_region(qr, group=self.pg_collection.tp)
        s, b, _ = x.shape
        q, _ = self.linear_wq_b(qr)
        q = self._apply_rope(q.view(s, b, self.n_heads, self.head_dim), self.freqs_at(q_positions, seq_len), 1.0)
        w, _ = self.linear_weights_proj(x)
        # relu(a*c) = c*relu(a) for c>0, so scaling w instead of q.k is the same score as HF's; in
        # fp32 as HF (megatron-core keeps w in the input's dtype).
        w = w.float() * (self.n_heads ** -0.5) * self.softmax_scale
        return q, w


class GLMSparseAttention(MegatronModule):
    """DSA core attention: the indexer picks top-k keys per query, attention runs over them."""

    # megatron-core's MLA passes the layer input `x` and the normalized query latent `qr` to a core
    # attention that says it needs them (0.19.2's contract)
    requires_dsa_inputs = True

    def __init__(self, config, submodules, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout=None, softmax_scale=None, k_channels=None,
                 v_channels=None, cp_comm_type=None, pg_collection=None,
                 layer_number_offset: int = 0, index_share_state: topk_share.IndexShareState | None = None):
        # layer_number_offset: num_layers in the MTP layer, whose inner layer megatron-core numbers 1
        # (model/specs.py), so that its indexer loss is tracked after the decoder's, not on layer 1's.
        # index_share_state (IndexShare, model/modules/topk_share.py): the chunk's; this layer's role is
        # read from it by layer number (a shared layer builds no indexer). None: no sharing (the MTP layer).
        super().__init__(config=config)
        self.layer_number = layer_number + layer_number_offset
        self.index_share_state = index_share_state or topk_share.IndexShareState()
        self.share_role = self.index_share_state.roles.get(self.layer_number, ShareRole())
        self.indexer = (None if self.share_role.source is not None else
                        build_module(submodules.indexer, config=config, pg_collection=pg_collection))
        # megatron's Attention base builds core attention once without k_channels before MLA
        # rebuilds it with them; the first instance is discarded.
        if softmax_scale is None:
            softmax_scale = (k_channels or config.kv_channels) ** -0.5
        self.softmax_scale = softmax_scale
        # The loss tracker counts the MTP layer after the decoder layers.
        self.tracked_layers = config.num_layers + (config.mtp_num_layers or 0)
        # top-k per query: each step's (pretrain/recipe.py apply_step_settings), as megatron-core's DSAttention
        self.index_topk = config.dsa_indexer_topk
        # None: --dsa-kernel-backend's (blockwise or triton, model/mcore_config.py); "dense" forces
        # megatron-core's unfused torch reference (the "none" backend's functions), as the tools do.
        self.dsa_path = None

    def resolved_path(self, device: torch.device) -> str:
        path = self.dsa_path or self.config.dsa_kernel_backend
        if path == "triton" and device.type != "cuda":
            raise ValueError(f"--dsa-kernel-backend triton runs on CUDA tensors, not on {device.type}")
        return path

    def forward(self, query, key, inputs: LatentAttentionInputs, attention_mask, x, qr, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """query [sq, b, heads, qk_head_dim + rope] (RoPE'd), key: the latent rows [S, b, kv_lora +
        rope] of every position (global order), `inputs`: what megatron passes as `value` (module
        docstring). Returns [sq, b, heads * v_head_dim]."""
        if packed_seq_params is not None:
            raise NotImplementedError("DSA does not support packed sequences")
        if not isinstance(inputs, LatentAttentionInputs):
            raise RuntimeError("GLMSparseAttention needs the latent inputs of "
                               "model.modules.cp_attention.CPMLASelfAttention (check the layer spec)")
        cfg = self.config
        path = self.resolved_path(query.device)
        if self.indexer is None:
            return self._shared(query, key, inputs, path)
        rope_positions = inputs.q_positions if inputs.rope_positions is None else inputs.rope_positions
        q_i, w = self.indexer(x.detach(), qr.detach(), rope_positions, key.shape[0])
        coeff = cfg.dsa_indexer_loss_coeff or 0.0
        with_loss = self.training and torch.is_grad_enabled() and coeff > 0
        tp_group = self.indexer.pg_collection.tp
        attend = self._dense_topk if path == "dense" else self._sparse_topk
        output, loss, topk = attend(query, key, inputs, q_i, w, coeff if with_loss else 0.0, tp_group, path)
        if self.share_role.publishes:
            topk_share.publish(self, topk)
        if with_loss:
            # Logged value: CP ranks hold equal numbers of queries, so their mean is the global mean.
            DSAIndexerLossLoggingHelper.save_loss_to_tracker(
                loss, self.layer_number, self.tracked_layers, avg_group=inputs.cp_group)
            # A mean over this rank's queries. Its backward scale is the tokens per micro-batch on
            # this rank (pretrain/recipe.py: S/CP per sequence), which makes it a token sum like the
            # LM loss; the sum over CP ranks (in DDP's DP x CP reduction) is then one process's.
            output = DSAIndexerLossAutoScaler.apply(output, loss)
        elif self.training and torch.is_grad_enabled():
            # Without the loss nothing differentiable reads the indexer's queries and head weights
            # (top-k indices are not), but megatron's DDP with --overlap-grad-reduce starts a bucket's
            # reduce only once every parameter in it had its grad hook: keep them in the graph with a
            # zero gradient, as megatron-core's DSA does (it attaches the KL times coefficient 0).
            # (The keys' weights get theirs through the latent gather of cp_attention.py.)
            output = DSAIndexerLossAutoScaler.apply(output, (q_i.sum() + w.sum()) * 0.0)
        return output

    def _shared(self, query, key, inputs, path):
        """A shared layer: the source layer's top-k of this micro-batch (topk_share.take, exact
        under recompute), no indexer, no indexer loss."""
        topk = topk_share.take(self, self.share_role.source, last=self.share_role.last)
        attend = self._dense_topk if path == "dense" else self._sparse_topk
        output, _, _ = attend(query, key, inputs, None, None, 0.0, None, path, topk=topk)
        return output

    def _split_weight(self, inputs, heads):
        cfg = self.config
        w_kv = inputs.kv_up_weight.view(heads, cfg.qk_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        return torch.split(w_kv, [cfg.qk_head_dim, cfg.v_head_dim], dim=1)

    def _sparse(self, query, latent, inputs, q_i, w, coeff, tp_group, path):
        return GLMSparseAttention._sparse_topk(self, query, latent, inputs, q_i, w, coeff, tp_group, path)[:2]

    def _sparse_topk(self, query, latent, inputs, q_i, w, coeff, tp_group, path, topk=None):
        """The absorbed form: q_h -> [W_uk,h^T q_nope,h | q_pe,h] scores the latent rows directly.
        `topk`: given on a shared layer (then q_i, w are None); returns (output, loss, topk)."""
        cfg = self.config
        sq, b, heads, _ = query.shape
        w_uk, w_uv = self._split_weight(inputs, heads)
        q_nope, q_pe = torch.split(query, [cfg.qk_head_dim, cfg.qk_pos_emb_head_dim], dim=-1)
        q = torch.cat([torch.einsum("sbhd,hdc->bshc", q_nope, w_uk), q_pe.transpose(0, 1)], dim=-1)
        # batch-first and contiguous: the kernels and the torch path gather whole rows of these
        kv = latent.transpose(0, 1).contiguous()  # [b, S, kv_lora + rope]
        starts = inputs.q_doc_starts  # packed documents: the top-k (and so the attention) stays inside each
        if path == "triton":
            from model.kernels import indexer_scores_triton, sparse_mla_triton

            scores_fn, attend = indexer_scores_triton, sparse_mla_triton
        else:
            scores_fn, attend = None, blockwise.sparse_mla_torch
        if topk is None:
            k_i = inputs.index_keys.transpose(0, 1).contiguous()
            q_i, w = q_i.transpose(0, 1), w.transpose(0, 1)
            topk = blockwise.indexer_topk(q_i, w, k_i, inputs.q_positions, self.index_topk, scores_fn=scores_fn,
                                          q_start=starts)
        o_latent = attend(q, kv, topk, self.softmax_scale, cfg.kv_lora_rank)  # [b, sq, heads, kv_lora]
        output = torch.einsum("bshc,hvc->sbhv", o_latent, w_uv).reshape(sq, b, heads * cfg.v_head_dim)
        loss = None
        if coeff > 0:
            loss = blockwise.indexer_kl_loss_blockwise(
                q_i, w, k_i, inputs.q_positions, topk, q.detach(), kv.detach(), self.softmax_scale, coeff,
                cfg.dsa_indexer_use_sparse_loss, tp_group, q_start=starts)
        return output.contiguous(), loss, topk

    def _dense(self, query, latent, inputs, q_i, w, coeff, tp_group):
        return GLMSparseAttention._dense_topk(self, query, latent, inputs, q_i, w, coeff, tp_group)[:2]

    def _dense_topk(self, query, latent, inputs, q_i, w, coeff, tp_group, path="dense", topk=None):
        """The reference: megatron-core's unfused torch functions (its "none" backend) on the same
        inputs -- top-k from the full [b, s_q, S] index scores, the absorbed attention over
        [b, heads, s_q, S] scores, its KL (a mean over queries, as ours)."""
        cfg = self.config
        sq, b, heads, _ = query.shape
        skv = latent.shape[0]
        w_uk, w_uv = self._split_weight(inputs, heads)
        q_nope, q_pe = torch.split(query, [cfg.qk_head_dim, cfg.qk_pos_emb_head_dim], dim=-1)
        q = torch.cat([torch.einsum("sbhd,hdc->sbhc", q_nope, w_uk), q_pe], dim=-1)
        key = latent.unsqueeze(2)  # [S, b, 1, kv_lora + rope]: one latent key for every head
        mask = causal_mask(inputs.q_positions, skv, inputs.q_doc_starts)
        if topk is None:  # a shared layer is given its source's
            index_scores, topk = upstream_dsa.fused_qk_topk_naive(q_i, inputs.index_keys, w, self.index_topk,
                                                                  mask=mask)
        o_latent = upstream_dsa._unfused_absorbed_dsa_fn(q, key, topk, self.softmax_scale, cfg.kv_lora_rank, mask=mask)
        output = torch.einsum("sbhc,hvc->sbhv", o_latent, w_uv).reshape(sq, b, heads * cfg.v_head_dim)
        loss = None
        if coeff > 0:
            loss = upstream_dsa.compute_dsa_indexer_loss(
                index_scores, topk, q.detach(), key.detach().expand(-1, -1, heads, -1), self.softmax_scale, coeff,
                cfg.dsa_indexer_use_sparse_loss, SimpleNamespace(tp=tp_group), mask=mask)
        return output, loss, topk
