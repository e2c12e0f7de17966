"""Context parallelism for GLM-5's MLA + DSA attention, and the latent form of MLA that the DSA core
attention runs on at any CP size (CP = 1 is the one-chunk case). megatron-core 0.19.2's own CP for DSA
lives in its absorbed-MLA module (--dsa-kernel-backend none/tilelang/cudnn): cp_comm_type "allgather"
only, sequence parallelism required with TP > 1 and the indexer loss refused there; this module has
none of those limits.

Layout (Megatron-LM's convention): the sequence of S tokens is cut into 2·CP chunks of S/(2·CP);
CP rank r holds chunks r and 2·CP-1-r, so every rank has the same causal work (an early chunk with
few keys plus a late one with many). Under sequence parallelism the TP ranks of a CP rank further
split its S/CP tokens evenly. `split_for_context_parallel` cuts batches this way (pretrain/step.py)
and `context_parallel_positions` gives the global positions.

Per layer, `CPMLASelfAttention.get_query_key_value_tensors` replaces megatron's query/key/value
computation:
1. each rank computes, for its own tokens only, the compressed KV latent (kv_layernorm applied),
   the shared RoPE key k_pe (rotated at the tokens' global positions) and the indexer's key k_I
   (LayerNorm(wk x), rotated);
2. ONE all-gather collects [latent | k_pe | k_I] of every token: 512 + 64 + 128 = 704 values per
   token for GLM-5, over the CP group (over the TP×CP group under sequence parallelism, which also
   replaces the TP all-gather of the sequence); its backward is the matching reduce-scatter, which
   sums every rank's gradient for a token and hands it to the token's owner;
3. the gathered rows are put in global order; they are not up-projected: the core attention gets
   the latent rows [latent | k_pe] of all S positions as its `key` and this TP rank's slice of
   the up-projection weight, and runs in the absorbed form (queries stay local, RoPE'd at this
   rank's global positions);
4. the core attention (model/modules/dsa.py) receives the queries' positions and the gathered k_I
   (`LatentAttentionInputs`, returned in the value's place, which megatron hands on as `value`):
   the indexer scores this rank's queries against every key with the causal mask at global
   positions, takes its top-k, and sparse attention runs locally.
Packed documents (model/modules/documents.py): megatron's `attention_mask` carries each token's
document start and RoPE position; keys and queries are RoPE'd at those positions where they are made,
and the core attention keeps each query's top-k inside its document (documents may cross CP chunks:
every key is gathered, the mask is by global row).
Without CP the same steps run with one chunk: the gather is the TP all-gather of sequence
parallelism (or, without SP, an identity whose backward sums over TP).

Gradient bookkeeping (see docs/CONTEXT_PARALLEL.md): the latent and k_pe are consumed by each TP
rank with its own heads, so the reduce-scatter's (or all-reduce's) sum is the full gradient. k_I
is consumed identically by every TP rank (the indexer is replicated over TP), so its gradient is
divided by TP before that sum; under SP wk and k_norm then see only this rank's tokens and are
marked for the TP all-reduce in finalize_model_grads (GLMIndexer does that). Sums over CP ranks happen in DDP's
reduction over DP×CP, like every other weight's.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_latent_attention import MLASelfAttention

from model.modules.documents import rope_freqs, unpack
from model.modules.dsa import GLMSparseAttention, LatentAttentionInputs
from model.modules.rope import apply_mla_rope


def context_parallel_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions [S/CP] of CP rank `cp_rank`'s tokens: chunk r, then chunk 2·CP-1-r."""
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x CP = {2 * cp_size}")
    c = seq_len // (2 * cp_size)
    last = 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device),
                      torch.arange(last * c, (last + 1) * c, device=device)])


def split_for_context_parallel(t: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's part of `t` along its sequence dimension `dim` (chunks r and 2·CP-1-r)."""
    if cp_size == 1:
        return t
    seq_len = t.shape[dim]
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x CP = {2 * cp_size}")
    chunks = t.unflatten(dim, (2 * cp_size, seq_len // (2 * cp_size)))
    index = torch.tensor([cp_rank, 2 * cp_size - 1 - cp_rank], device=t.device)
    return chunks.index_select(dim, index).flatten(dim, dim + 1).contiguous()


def to_global_order(gathered: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Rows gathered in CP-rank order (each rank's chunks r, 2·CP-1-r) -> global order, along dim 0."""
    g = gathered.unflatten(0, (cp_size, 2, -1))
    return torch.cat([g[:, 0], g[:, 1].flip(0)]).flatten(0, 1)


class CPMLASelfAttention(MLASelfAttention):
    """megatron-core's MLA self-attention in the latent form, with context parallelism, for the DSA core
    attention GLMSparseAttention (every spec of model/specs.py builds that).

    Only `get_query_key_value_tensors` differs (module docstring), at any CP size; parameters, their
    names and the rest of the forward are megatron's. With another core attention it is
    MLASelfAttention unchanged (and CP 1 only).
    """

    def __init__(self, config, submodules, layer_number, attn_mask_type=AttnMaskType.padding,
                 cp_comm_type=None, pg_collection=None, **kwargs):
        # kwargs: what megatron-core's TransformerLayer passes on (pp_layer_offset, name)
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type, pg_collection=pg_collection,
                         **kwargs)
        pg = self.pg_collection
        self.cp_size = pg.cp.size()
        self.latent_form = isinstance(self.core_attention, GLMSparseAttention)
        if not self.latent_form:
            if self.cp_size > 1:
                raise ValueError(f"--context-parallel-size {self.cp_size} with MLA+DSA does not support "
                                 "a core attention other than GLMSparseAttention")
            return
        # --recompute-modules mla_up_proj recomputes the per-head K/V up-projection, which the latent
        # form never makes (the core attention reads the latent): nothing to recompute.
        self.recompute_up_proj = False
        unsupported = [
            (config.rope_type != "rope", f"rope_type {config.rope_type!r} (only 'rope')"),
            (config.q_lora_rank is None, "q_lora_rank None (DSA needs the query latent)"),
            (config.apply_rope_fusion, "apply_rope_fusion"),
            (config.cache_mla_latents, "cache_mla_latents"),
            # the config, not the module: TE's linears keep an empty `bias` tensor when built without one
            (config.add_bias_linear, "add_bias_linear (a bias in linear_kv_up_proj)"),
        ]
        for bad, what in unsupported:
            if bad:
                raise ValueError(f"MLA+DSA (--context-parallel-size {self.cp_size}) does not support {what}")
        # Under sequence parallelism each rank holds S/(CP·TP) tokens and gathers over TP×CP in one
        # collective; to_global_order needs that group's ranks ordered CP-major, TP-minor.
        self.sp = config.sequence_parallel and pg.tp.size() > 1
        if self.sp and self.cp_size > 1:
            group = getattr(pg, "tp_cp", None) or parallel_state.get_tensor_and_context_parallel_group()
            if group.rank() != pg.cp.rank() * pg.tp.size() + pg.tp.rank():
                raise RuntimeError("the TP x CP group is not ordered CP-major, TP-minor")
        else:
            group = pg.tp if self.sp else pg.cp
        self.kv_gather_group = group

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        # megatron's MLA forward does not hand attention_mask to get_query_key_value_tensors: the packed
        # documents' positions (model/modules/documents.py) are kept for it over this call
        self._documents = attention_mask if self.latent_form else None
        try:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        finally:
            self._documents = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, position_ids=None,
                                    packed_seq_params=None, inference_context=None, *, inference_params=None):
        if not self.latent_form:
            return super().get_query_key_value_tensors(
                hidden_states, key_value_states, position_ids, packed_seq_params,
                inference_context=inference_context, inference_params=inference_params)
        if packed_seq_params is not None or inference_context is not None or inference_params is not None:
            raise NotImplementedError("MLA+DSA: training without packed sequences only")
        return self._latent_qkv(hidden_states)

    def _latent_qkv(self, hidden_states):
        cfg, pg = self.config, self.pg_collection
        tp_size, tp_rank = pg.tp.size(), pg.tp.rank()
        s_own, b, _ = hidden_states.shape  # this rank's tokens (its SP slice under SP)
        s_local = s_own * (tp_size if self.sp else 1)  # this CP rank's tokens, S/CP
        seq_len = s_local * self.cp_size
        q_positions = context_parallel_positions(seq_len, self.cp_size, pg.cp.rank(), hidden_states.device)
        q_starts, rope_positions = unpack(getattr(self, "_documents", None))
        if rope_positions is None:  # one document: RoPE at the global rows
            rope_positions = q_positions
        elif rope_positions.shape != (hidden_states.shape[1], s_local):
            raise ValueError(f"attention_mask holds {tuple(rope_positions.shape)} positions for "
                             f"{(hidden_states.shape[1], s_local)} tokens (batch, this rank's sequence)")
        own_positions = rope_positions[..., tp_rank * s_own:(tp_rank + 1) * s_own] if self.sp else rope_positions
        freqs = self.rotary_pos_emb.get_emb(seq_len)  # [S, 1, 1, rope]

        # Query latent: as megatron (a TP-sharded down projection is gathered, then re-split for SP).
        q_compressed, _ = self.linear_q_down_proj(hidden_states)
        if q_compressed.size(-1) != cfg.q_lora_rank:
            q_compressed = gather_from_tensor_model_parallel_region(q_compressed)
            if cfg.sequence_parallel:
                q_compressed = scatter_to_sequence_parallel_region(q_compressed)
        q_compressed = self.q_layernorm(q_compressed)

        # This rank's tokens' KV latent, shared RoPE key and indexer key.
        kv_combined, _ = self.linear_kv_down_proj(hidden_states)
        if kv_combined.size(-1) != cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim:
            kv_combined = gather_from_tensor_model_parallel_region(kv_combined)
            if cfg.sequence_parallel:
                kv_combined = scatter_to_sequence_parallel_region(kv_combined)
        latent, k_pe = torch.split(kv_combined, [cfg.kv_lora_rank, cfg.qk_pos_emb_head_dim], dim=-1)
        latent = self.kv_layernorm(latent)
        k_pe = apply_mla_rope(k_pe.unsqueeze(-2), rope_freqs(freqs, own_positions), cfg, pg.cp)
        indexer = self.core_attention.indexer  # None on an IndexShare "shared" layer: no k_I to gather
        own = [latent, k_pe.squeeze(-2)]
        if indexer is not None:
            own.append(indexer.index_keys(hidden_states.detach(), own_positions, seq_len).to(latent.dtype))

        # ONE all-gather (backward: reduce-scatter) of every token's [latent | k_pe | k_I].
        every = torch.cat(own, dim=-1)
        if self.sp or self.cp_size > 1:
            every = to_global_order(gather_from_sequence_parallel_region(every, group=self.kv_gather_group),
                                    self.cp_size)
        latent_rows, k_index_all = torch.split(
            every, [cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim, indexer.head_dim if indexer else 0], dim=-1)
        k_index_all = k_index_all if indexer is not None else None
        if tp_size > 1 and not self.sp:
            # Each TP rank's heads read the latent rows: sum their gradients over TP (what a
            # column-parallel linear does for its input), shared rope key included.
            latent_rows = copy_to_tensor_model_parallel_region(latent_rows, group=pg.tp)
        if self.sp and k_index_all is not None and k_index_all.requires_grad:
            # Every TP rank runs the same indexer on the same keys: count their gradient once.
            # (No gradient reaches it without the indexer loss: the hook then sees None.)
            k_index_all.register_hook(lambda g: None if g is None else g / tp_size)
        heads = self.num_attention_heads_per_partition

        # Queries of this rank's tokens, RoPE'd at their global positions.
        q, _ = self.linear_q_up_proj(q_compressed)
        q = q.view(s_local, b, heads, self.q_head_dim)
        q_nope, q_pe = torch.split(q, [cfg.qk_head_dim, cfg.qk_pos_emb_head_dim], dim=-1)
        q_pe = apply_mla_rope(q_pe, rope_freqs(freqs, rope_positions), cfg, pg.cp)
        query = torch.cat([q_nope, q_pe], dim=-1)

        # megatron's forward hands (query, key, value) to the core attention: the latent rows go as
        # its `key` and, as there is no value tensor in the absorbed form, the rest of what it needs
        # goes in the value's place (model/modules/dsa.py's docstring).
        inputs = LatentAttentionInputs(
            q_positions=q_positions, index_keys=k_index_all, kv_up_weight=self.linear_kv_up_proj.weight,
            cp_group=pg.cp if self.cp_size > 1 else None, q_doc_starts=q_starts, rope_positions=rope_positions)
        return query.contiguous(), latent_rows.contiguous(), inputs, q_compressed, latent
