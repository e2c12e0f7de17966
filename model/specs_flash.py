"""GLM-5.3-Flash's layers on megatron-core's HybridModel (model/mcore_config_flash.py makes the pattern).

The residual between hybrid layers is `hc_mult` (N) mHC streams carried as one tensor [s, b, N x hidden]
(stream-major: a view of [s, b, N, hidden]), so HybridStack passes it on unchanged and a pipeline p2p
buffer is told one width. `FlashHybridStack` copies the embeddings into the N streams on the first stage
and averages them before the final norm on the last (transformers' `hc_head`).

Every hybrid layer is a `FlashLayer`: mHC pre-map -> norm -> block -> mHC merge (transformers'
`attn_hc` / `ffn_hc` around its attention and its MLP: one FlashLayer each). Not megatron's
TransformerLayer: its bias-dropout-add adds one residual, where mHC mixes N streams. The blocks:
- `G`: KDA (model/modules/kda.py; megatron-core 0.19.2 has none);
- `D`: megatron-core's own MLASelfAttention with `qk_pos_emb_head_dim` 0 (NoPE: its rotary dims are
  empty) and `PooledSparseAttention` as its core attention -- the pooled-key DSA indexer
  (model/modules/pooled_indexer.py) picks the keys, softmax runs over them;
- `-` / `E`: megatron-core's MLP / MoELayer with the clamped SwiGLU (model/modules/clamped_swiglu.py).
Packed documents (--reset-attention-mask) arrive as model/modules/documents.py's `attention_mask`: KDA's state and
convolution and the pooled indexer's selection stay inside each document (no RoPE: positions are unused).
The sparse attention here is a dense masked torch path (O(s^2) scores): no fused pooled-DSA kernel yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from model.modules.documents import unpack
from model.modules.hybrid import GLMHybridStack
from model.modules.hyper_connection import HyperConnection, collapse_streams
from model.modules.kda import KimiDeltaAttention
from model.modules.pooled_indexer import PooledKeyIndexer, selection_mask


class PooledSparseAttention(MegatronModule):
    """MLA's core attention for GLM-5.3-Flash: softmax(q k^T * scale) v over the keys the pooled indexer
    selects (transformers' Glm5NextTextAttention with its top-k mask). megatron-core passes the layer input
    `x` and the normalised query latent `qr` to a core attention that asks for them (`requires_dsa_inputs`).
    The indexer runs under no_grad (as transformers'): its KL training loss is not here yet."""

    requires_dsa_inputs = True

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type=None, softmax_scale=None,
                 k_channels=None, v_channels=None, cp_comm_type=None, pg_collection=None, **_unused):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.indexer = PooledKeyIndexer(config.flash)

    def forward(self, query, key, value, attention_mask, x=None, qr=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **_unused):
        """query/key [s, b, heads, qk_head_dim], value [s, b, heads, v_head_dim] -> [s, b, heads x v_head_dim]."""
        if packed_seq_params is not None:
            raise NotImplementedError("GLM-5.3-Flash's pooled DSA takes no packed_seq_params (THD) yet")
        s = key.shape[0]
        doc_starts, _ = unpack(attention_mask)  # packed documents: each indexed alone, its selection inside it
        mask = selection_mask(self.indexer(x, qr, doc_starts), s)  # [b, sq, s]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        scores = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * self.softmax_scale
        probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1).to(v.dtype)
        return (probs @ v).permute(2, 0, 1, 3).flatten(-2)


class KDAMixer(KimiDeltaAttention):
    """KDA in a hybrid layer's mixer slot (megatron's constructor arguments)."""

    def __init__(self, config, **_unused):
        super().__init__(config.flash, backend=getattr(config, "kda_backend", "auto"))

    def forward(self, hidden_states, attention_mask=None, **_unused):
        return super().forward(hidden_states, doc_starts=unpack(attention_mask)[0])


@dataclass
class FlashLayerSubmodules:
    norm: type | ModuleSpec
    block: type | ModuleSpec


class FlashLayer(MegatronModule):
    """One mHC-wrapped block of a hybrid stack: [s, b, N x hidden] in and out. `mixer` True: a KDA / MLA
    layer (its parameters `input_layernorm`, `self_attention`), else an MLP / MoE (`pre_mlp_layernorm`,
    `mlp`), as megatron's TransformerLayer names them; `hyper_connection` holds the mHC maps."""

    def __init__(self, config, submodules: FlashLayerSubmodules, layer_number: int = 1, mixer: bool = True,
                 pg_collection=None, **_unused):
        super().__init__(config=config)
        self.layer_number, self.mixer, self.hc_mult = layer_number, mixer, config.flash.hc_mult
        self.hyper_connection = HyperConnection.of(config.flash)
        norm = build_module(submodules.norm, config=config, hidden_size=config.hidden_size,
                            eps=config.layernorm_epsilon)
        extra = {"pg_collection": pg_collection} if pg_collection is not None else {}
        if mixer:
            self.input_layernorm = norm
            self.self_attention = build_module(submodules.block, config=config, layer_number=layer_number, **extra)
        else:
            self.pre_mlp_layernorm = norm
            if getattr(submodules.block, "module", None) is MLP:  # megatron's MLP takes the TP group, MoELayer all
                extra = {"tp_group": pg_collection.tp} if pg_collection is not None else {}
            block = submodules.block  # megatron's MoE spec is a partial of MoELayer, called as TransformerLayer does
            self.mlp = build_module(block, config=config, **extra) if isinstance(block, (ModuleSpec, type)) \
                else block(config=config, **extra)
            if hasattr(self.mlp, "set_layer_number"):
                self.mlp.set_layer_number(layer_number)

    def forward(self, hidden_states, attention_mask=None, inference_context=None, packed_seq_params=None, **_unused):
        streams = hidden_states.unflatten(-1, (self.hc_mult, -1))
        block_in, post, comb = self.hyper_connection(streams)
        if self.mixer:
            out = self.self_attention(self.input_layernorm(block_in), attention_mask=attention_mask)
        else:
            out = self.mlp(self.pre_mlp_layernorm(block_in))
        if isinstance(out, tuple):
            out = out[0]  # (output, bias): no linear biases in GLM-5.3-Flash
        return HyperConnection.merge(out, streams, post, comb).flatten(-2)


class FlashHybridStack(GLMHybridStack):
    """HybridStack over mHC streams: embeddings copied into hc_mult streams on entry (first stage), the
    streams averaged before the final norm (last stage)."""

    def __init__(self, config, submodules, **kwargs):
        super().__init__(config, submodules, **kwargs)
        self.hc_mult = config.flash.hc_mult
        if getattr(self, "final_norm", None) is not None:
            self.final_norm.register_forward_pre_hook(
                lambda _module, args: (collapse_streams(args[0].unflatten(-1, (self.hc_mult, -1))), *args[1:]))

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        if self.pre_process:
            hidden_states = hidden_states.repeat(1, 1, self.hc_mult)  # [s, b, N x hidden], stream-major
        return super().forward(hidden_states, attention_mask, *args, **kwargs)


def flash_stack_spec(tconfig, backend) -> ModuleSpec:
    """HybridModel's `hybrid_stack_spec` for GLM-5.3-Flash: `G` KDA, `D` NoPE MLA + pooled DSA, `-` MLP, `E`
    MoE, each inside its FlashLayer; the backend's norms and linears (the local backend: TP 1)."""
    from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules

    norm = backend.layer_norm(rms_norm=True)
    mla = ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_down_proj=backend.down_projection(), q_layernorm=norm,
            linear_q_up_proj=backend.column_parallel_linear(),
            linear_kv_down_proj=backend.down_projection(), kv_layernorm=norm,
            linear_kv_up_proj=backend.column_parallel_linear(),
            core_attention=PooledSparseAttention, linear_proj=backend.row_parallel_linear()))
    dense = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=backend.column_parallel_linear(),
                                                            linear_fc2=backend.row_parallel_linear()))
    moe = get_moe_module_spec_for_backend(backend, num_experts=True, moe_grouped_gemm=bool(tconfig.moe_grouped_gemm))

    def layer(block, mixer: bool) -> ModuleSpec:
        return ModuleSpec(module=FlashLayer, params={"mixer": mixer},
                          submodules=FlashLayerSubmodules(norm=norm, block=block))

    return ModuleSpec(module=FlashHybridStack, params={"final_norm": norm}, submodules=HybridStackSubmodules(
        gdn_layer=layer(KDAMixer, True), dsa_layer=layer(mla, True),
        mlp_layer=layer(dense, False), moe_layer=layer(moe, False)))
