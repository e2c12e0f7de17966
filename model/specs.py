"""GLM-5 layer specs: one function builds every layer from a backend provider.

The backend (local torch modules on CPU, Transformer Engine on GPU) only chooses which linear and
norm classes fill the slots; the structure is the same, so the parameter names -- and therefore
checkpoints and the HF export map -- are the same on both. Layers 0..first_k_dense_replace-1 get a
dense SwiGLU MLP, the rest (and the MTP layer) an MoE block with one shared expert.
Norms stay separate modules (not TE's fused LayerNormLinear) so the D1 fix below has a place.

Where the attention lives (`attention_spec`; "<": subclass of, ".x": its submodule x). The classes are
the same on both backends (LocalBackend, te_backend below): only the linears and norms in their slots
differ -- the local backend shards MLA's q/kv down projections over TP, TE's replicates them.

--dsa-kernel-backend blockwise | triton (ours; the default):
  GLMAttention            modules/attention_recompute.py: selective recompute of the core attention
                          (--recompute-modules core_attn) with its per-forward inputs in the checkpoint
   < CPMLASelfAttention   modules/cp_attention.py: the latent form of MLA at any CP size -- queries at this
                          rank's global positions, ONE all-gather (CP; TP x CP under SP) of every token's
                          [latent | k_pe | k_I], handed on as `LatentAttentionInputs`
   < MLASelfAttention     megatron-core: the projections, the forward, linear_proj
  .core_attention         GLMSparseAttention, modules/dsa.py: indexer -> top-k -> attention -> KL loss, on
                          the path `resolved_path` picks: blockwise (modules/dsa_blockwise.py, O(S*k)
                          memory: running top-k over key chunks, sparse MLA on the latent rows, the KL per
                          block of queries), triton (model/kernels/: the score tiles and the sparse MLA on
                          CUDA, the rest blockwise), dense (`dsa_path`, tests and tools: megatron-core's
                          unfused [b, heads, s_q, S] functions, the reference)
  .core_attention.indexer GLMIndexer < DSAIndexer, modules/dsa.py: at global positions; None on an
                          IndexShare shared layer
--dsa-kernel-backend none | tilelang | cudnn (megatron-core's, `upstream_attention_spec`):
  AbsorbedMLASelfAttention (megatron-core; its own CP, allgather, and selective recompute)
  .core_attention         GLMDSAttention < DSAttention, modules/topk_share.py (IndexShare's replay only)
  .core_attention.indexer DSAIndexer (megatron-core)
Dense attention has no class of its own: the DSA warm-up (pretrain/recipe.py) sets top-k to every key.
IndexShare: model/index_share.py turns the per-layer "full"/"shared" list into each layer's ShareRole;
  modules/topk_share.py's IndexShareState (one per model chunk, made here, handed to every core
  attention by its spec) holds the roles and the top-k in flight. GLMSparseAttention publishes and
  takes by its role; megatron-core's DSAttention shares by its own dsa_indexer_topk_freq/offset
  (model/mcore_config.py). Under full or selective recompute both replay what a shared layer's first
  pass read (`topk_share.take`).
The MTP layer: the same attention with `layer_number_offset` = num_layers, never sharing.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.models.gpt.experimental_attention_variant_module_specs import get_dsa_module_spec_for_backend
from megatron.core.transformer.experimental_attention_variant.dsa import (
    DSAIndexerSubmodules,
    DSAttentionSubmodules,
)
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlock,
    MultiTokenPredictionBlockSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from model.modules.attention_recompute import GLMAttention
from model.modules.dsa import GLMIndexer, GLMSparseAttention
from model.modules.linear import DuplicatedLinear
from model.mcore_config import UPSTREAM_DSA_BACKENDS
from model.modules.norms import LayerNorm, RMSNorm, apex_rmsnorm, fixed_eps_norm
from model.modules.topk_share import GLMDSAttention, IndexShareState

LATENT_NORM_EPS = 1e-6  # HF's q_a_layernorm / kv_a_layernorm (docs/HF_MAPPING.md, D2)


class LocalBackend(LocalSpecProvider):
    """megatron-core's local provider, with a sequence-parallel-capable RMSNorm and the replicated
    linear the DSA indexer needs."""

    def layer_norm(self, rms_norm: bool = True, for_qk: bool = False, has_residual: bool = False) -> type:
        # rms_norm=False: the DSA indexer's k_norm (megatron-core's specs ask for it by that argument)
        return (apex_rmsnorm() or RMSNorm) if rms_norm else LayerNorm

    def linear(self) -> type:
        return DuplicatedLinear

    def down_projection(self) -> type:
        # MLA accepts ColumnParallelLinear here (it gathers the sharded output itself).
        return ColumnParallelLinear


def te_backend():
    from megatron.core.extensions.transformer_engine import TELinear, TENorm
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    class TEBackend(TESpecProvider):
        def layer_norm(self, rms_norm: bool = True, for_qk: bool = False, has_residual: bool = False) -> type:
            return TENorm  # RMSNorm or LayerNorm by the config's `normalization` (the indexer's: LayerNorm)

        def down_projection(self) -> type:
            return TELinear  # replicated over TP, as MLA expects for TE

    return TEBackend()


def get_backend(use_te: bool):
    return te_backend() if use_te else LocalBackend()


def attention_spec(backend, tconfig, layer_number_offset: int = 0,
                   index_share_state: IndexShareState | None = None) -> ModuleSpec:
    """The attention of every layer: megatron-core's for its --dsa-kernel-backend values, ours for
    blockwise and triton. The parameters (names, shapes, layouts) are the same either way; a shared
    IndexShare layer (by its role in `index_share_state`, model/modules/topk_share.py; None: no
    sharing) has no indexer in either."""
    latent_norm = fixed_eps_norm(backend.layer_norm(rms_norm=True), LATENT_NORM_EPS)
    if tconfig.dsa_kernel_backend in UPSTREAM_DSA_BACKENDS:
        return upstream_attention_spec(backend, tconfig, latent_norm, index_share_state)
    indexer = ModuleSpec(
        module=GLMIndexer,
        submodules=DSAIndexerSubmodules(linear_wq_b=backend.linear(), linear_wk=backend.linear(),
                                        k_norm=backend.layer_norm(rms_norm=False, for_qk=True),
                                        linear_weights_proj=backend.linear()),
    )
    return ModuleSpec(
        module=GLMAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_down_proj=backend.down_projection(),
            # D1: a separate q_layernorm, so the indexer receives the *normalized* query latent.
            q_layernorm=latent_norm,
            linear_q_up_proj=backend.column_parallel_linear(),
            linear_kv_down_proj=backend.down_projection(),
            kv_layernorm=latent_norm,
            linear_kv_up_proj=backend.column_parallel_linear(),
            core_attention=ModuleSpec(
                module=GLMSparseAttention, submodules=DSAttentionSubmodules(indexer=indexer),
                params={"layer_number_offset": layer_number_offset, "index_share_state": index_share_state}),
            linear_proj=backend.row_parallel_linear(),
        ),
    )


def upstream_attention_spec(backend, tconfig, latent_norm, index_share_state=None) -> ModuleSpec:
    """megatron-core's own GLM-5 attention (`get_dsa_module_spec_for_backend`: AbsorbedMLASelfAttention,
    DSAttention, DSAIndexer), with two slots changed. Its q/kv latent norms take the one
    `layernorm_epsilon` (1e-5) where transformers uses 1e-6 (docs/HF_MAPPING.md, D2): fixed-eps norms here.
    Its down projections are the backend's `linear()`, which AbsorbedMLA accepts only as TE's
    linear: the local backend's column-parallel one here (AbsorbedMLA gathers it). IndexShare: its
    DSAttention skips the indexer by `dsa_indexer_topk_freq/offset` (model/mcore_config.py); our
    subclass reads a shared layer's top-k exactly under recompute (model/modules/topk_share.py)."""
    spec = get_dsa_module_spec_for_backend(tconfig, backend)
    spec.submodules.core_attention.module = GLMDSAttention
    spec.submodules.core_attention.params = {"index_share_state": index_share_state}
    sub = spec.submodules
    sub.q_layernorm = sub.kv_layernorm = latent_norm
    sub.linear_q_down_proj = sub.linear_kv_down_proj = backend.down_projection()
    return spec


def mlp_spec(backend, moe: bool, grouped_gemm: bool) -> ModuleSpec:
    if moe:
        return get_moe_module_spec_for_backend(backend, num_experts=True, moe_grouped_gemm=grouped_gemm)
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()))


def layer_spec(backend, tconfig, moe: bool, grouped_gemm: bool, layer_number_offset: int = 0,
               index_share_state: IndexShareState | None = None) -> ModuleSpec:
    """A decoder layer of GPTModel's build (one IndexShareState.for_config(tconfig) for all of a chunk's
    layers); the MTP layer's inner layer (no `index_share_state`: always full) with
    `layer_number_offset` = num_layers (megatron-core numbers it 1: the offset files its DSA statistics
    after the decoder's)."""
    norm = backend.layer_norm(rms_norm=True)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention_spec(backend, tconfig, layer_number_offset, index_share_state),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp_spec(backend, moe, grouped_gemm),
            mlp_bda=get_bias_dropout_add,
        ),
    )


# --- HybridModel (model/layer_pattern.py): one spec per hybrid layer type --------------------------------
def _hybrid_submodules(backend, tconfig, mtp: bool):
    from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules

    from model.layer_pattern import hybrid_layer_number

    norm = backend.layer_norm(rms_norm=True)
    grouped = bool(tconfig.moe_grouped_gemm)
    if mtp:  # the MTP layer: always full, counted after the decoder's layers (model/modules/hybrid.py)
        attention = attention_spec(backend, tconfig, layer_number_offset=tconfig.num_layers)
    else:  # one IndexShareState for this chunk's attention layers, by their hybrid layer numbers
        attention = attention_spec(backend, tconfig,
                                   index_share_state=IndexShareState.for_config(tconfig, number=hybrid_layer_number))

    def mlp_layer(moe: bool) -> ModuleSpec:
        # HybridStack marks only its attention layers `is_mtp_layer`: the MTP layer's MoE needs it too, or its
        # router files its aux loss as decoder layer 2's, unscaled for a repeated MTP layer (router.py)
        return ModuleSpec(module=TransformerLayer, params={"is_mtp_layer": True} if mtp else {},
                          submodules=TransformerLayerSubmodules(pre_mlp_layernorm=norm, mlp=mlp_spec(backend, moe, grouped),
                                                                mlp_bda=get_bias_dropout_add))

    return HybridStackSubmodules(
        dsa_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=norm, self_attention=attention, self_attn_bda=get_bias_dropout_add)),
        mlp_layer=mlp_layer(moe=False),
        moe_layer=mlp_layer(moe=True),
    )


def hybrid_stack_spec(tconfig, backend) -> ModuleSpec:
    """HybridModel's `hybrid_stack_spec` for GLM-5 on `backend` (megatron-core's stock one is TE-only):
    `D` (DSA attention), `-` (dense SwiGLU), `E` (MoE), the MTP block, and the backend's final norm."""
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayerSubmodules

    from model.modules.hybrid import GLMHybridStack, GLMMTPLayer

    norm = backend.layer_norm(rms_norm=True)
    submodules = _hybrid_submodules(backend, tconfig, mtp=False)
    if tconfig.mtp_num_layers:
        mtp_layer = ModuleSpec(
            module=GLMMTPLayer, params={"mtp_submodules": _hybrid_submodules(backend, tconfig, mtp=True)},
            submodules=MultiTokenPredictionLayerSubmodules(enorm=norm, hnorm=norm, layer_norm=norm,
                                                           eh_proj=backend.column_parallel_linear()))
        submodules.mtp_block_spec = ModuleSpec(module=MultiTokenPredictionBlock,
                                               submodules=MultiTokenPredictionBlockSubmodules(layer_specs=[mtp_layer]))
    return ModuleSpec(module=GLMHybridStack, params={"final_norm": norm}, submodules=submodules)
