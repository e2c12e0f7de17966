"""GLM-5.3-Flash model configuration (transformers' `glm5_next`), with transformers' field names.

A dataclass beside GLM5Config (model/config.py), not fields on it: GLM-5.3-Flash is the first GLM-5
that is not GLM-5 reshaped (KDA linear attention in three of every four layers, NoPE MLA with a
pooled-key DSA indexer, mHC residual streams, a clamped SwiGLU), and GLM5Config's fields are exactly
`glm_moe_dsa`'s. Every field here is spelled as in `Glm5NextTextConfig`; `from_hf_dict` reads a
`glm5_next` config.json (its `text_config`, or the flat text-only form), a `glm5_next_text` one, and
transformers' legacy spellings (`linear_attn_config`, `index_topk_pattern`, `index_topk_freq`).

The model is built on HybridModel by model/specs_flash.py (model/mcore_config_flash.py refuses by name the
layouts not built yet); `refuse_to_build` names GLM-5.3-Flash where a GLM-5-only path is handed its config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from model import index_share

LINEAR, INDEXED = "linear_attention", "indexed_attention"  # transformers' layer_types
DENSE, SPARSE = "dense", "sparse"  # transformers' mlp_layer_types
MODEL_TYPES = ("glm5_next", "glm5_next_text")
# fields whose None is a value (linear_lower_bound None: the softplus forget gate, no lower bound)
_NULLABLE = {"bos_token_id", "eos_token_id", "pad_token_id", "linear_lower_bound"}


def _layer_types(n: int) -> tuple[str, ...]:
    """transformers' default: every fourth layer (3, 7, ...) MLA + DSA, the others KDA."""
    return tuple(INDEXED if i % 4 == 3 else LINEAR for i in range(n))


@dataclass
class GLM5FlashConfig:
    vocab_size: int = 154880
    hidden_size: int = 4096
    intermediate_size: int = 12288
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 45
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    n_shared_experts: int = 1
    n_routed_experts: int = 288
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int = 1536
    qk_rope_head_dim: int = 0  # NoPE MLA
    v_head_dim: int = 256
    qk_nope_head_dim: int = 256
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 1048576
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 154820
    bos_token_id: int | None = None
    eos_token_id: list[int] | int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 32
    swiglu_limit: float = 10.0
    linear_head_dim: int = 128
    linear_num_heads: int = 64
    linear_conv_kernel_dim: int = 4
    linear_lower_bound: float | None = -5.0
    hc_mult: int = 4
    hc_eps: float = 1e-6
    hc_sinkhorn_iters: int = 20
    router_aux_loss_coef: float = 0.001
    index_kpool: int = 16
    index_kpool_always_select_tail: bool = True
    # the released checkpoint carries one MTP layer (layers.45, which transformers skips on load)
    num_nextn_predict_layers: int = 1
    torch_dtype: str = "bfloat16"
    # per-layer schedules; None: transformers' defaults (derived in __post_init__)
    layer_types: tuple[str, ...] | None = None
    mlp_layer_types: tuple[str, ...] | None = None
    indexer_types: tuple[str, ...] | None = None
    # a glm5_next config.json's vision_config, carried as read (not trained here), so that a checkpoint
    # imported from it and its export describe the same model; None: transformers' defaults
    vision_config: dict | None = None

    model_type = "glm5_next"
    text_model_type = "glm5_next_text"
    architectures = ("Glm5NextForConditionalGeneration",)

    def __post_init__(self):
        n = self.num_hidden_layers
        self.layer_types = tuple(INDEXED if t == "full_attention" else t
                                 for t in (self.layer_types or _layer_types(n)))
        self.mlp_layer_types = tuple(self.mlp_layer_types or [DENSE] * min(3, n) + [SPARSE] * max(n - 3, 0))
        self.indexer_types = tuple(self.indexer_types or index_share.from_schedule(n, 1, 2))
        self.validate()

    # --- derived ------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def linear_qkv_dim(self) -> int:
        return self.linear_num_heads * self.linear_head_dim

    @property
    def layer_indexer_types(self) -> tuple[str, ...]:
        """GLM5Config's name for the per-layer IndexShare list (the layout checks read it by that name)."""
        return self.indexer_types

    @property
    def shares_top_k(self) -> bool:
        return index_share.SHARED in self.indexer_types

    def mtp_depths(self, mtp_num_layers: int | None = None) -> int:
        """GLM5Config.mtp_depths' contract; GLM-5.3-Flash's MTP layer is not built yet
        (model/mcore_config_flash.py refuses --mtp-num-layers by name), so no depth is trained."""
        return 0

    def is_linear_layer(self, i: int) -> bool:
        return self.layer_types[i] == LINEAR

    def is_moe_layer(self, i: int) -> bool:
        """0-based decoder layer index; the MTP layer (index >= num_hidden_layers) is MoE."""
        return i >= self.num_hidden_layers or self.mlp_layer_types[i] == SPARSE

    def has_indexer(self, i: int) -> bool:
        return self.layer_types[i] == INDEXED and self.indexer_types[i] == index_share.FULL

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"GLM5FlashConfig: {msg}")

        n = self.num_hidden_layers
        for name, allowed in (("layer_types", (LINEAR, INDEXED)), ("mlp_layer_types", (DENSE, SPARSE)),
                              ("indexer_types", (index_share.FULL, index_share.SHARED))):
            types = getattr(self, name)
            need(len(types) == n, f"{name} has {len(types)} entries for num_hidden_layers={n}")
            bad = [(i, t) for i, t in enumerate(types) if t not in allowed]
            need(not bad, f"{name}[{bad[0][0] if bad else 0}] is {bad[0][1] if bad else None!r}; only {allowed}")
        need(self.num_key_value_heads == self.num_attention_heads,
             f"num_key_value_heads={self.num_key_value_heads} must equal "
             f"num_attention_heads={self.num_attention_heads} (MLA)")
        need(self.qk_rope_head_dim == 0, f"qk_rope_head_dim={self.qk_rope_head_dim}: GLM-5.3-Flash's MLA is NoPE (0)")
        need(self.q_lora_rank is not None and self.q_lora_rank > 0,
             "q_lora_rank is required (the DSA indexer reads the query latent)")
        need(self.index_kpool >= 1, f"index_kpool={self.index_kpool} must be positive")
        need(self.index_topk % self.index_kpool == 0,
             f"index_topk={self.index_topk} must be divisible by index_kpool={self.index_kpool}")
        need(self.n_group == 1 and self.topk_group == 1, "group-limited routing (n_group/topk_group > 1) is not supported")
        need(self.num_experts_per_tok <= self.n_routed_experts,
             f"num_experts_per_tok={self.num_experts_per_tok} > n_routed_experts={self.n_routed_experts}")
        need(self.norm_topk_prob is True, f"norm_topk_prob={self.norm_topk_prob!r}: only true is supported")
        need(self.hidden_act == "silu", f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU; also the KDA convolutions')")
        need(not self.tie_word_embeddings, "tie_word_embeddings must be false")
        need(self.attention_bias is False, f"attention_bias={self.attention_bias!r}: only false is supported")
        need(self.hc_mult >= 1 and self.hc_sinkhorn_iters >= 1,
             f"hc_mult={self.hc_mult}, hc_sinkhorn_iters={self.hc_sinkhorn_iters} must be positive")
        need(self.swiglu_limit > 0, f"swiglu_limit={self.swiglu_limit} must be positive")
        need(self.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers must be 0 or 1")
        # transformers hands a "shared" DSA layer the top-k of the layer just before it only when that
        # layer is a full DSA layer (a KDA layer passes none on): anything else fails at its forward
        for i in range(n):
            if self.layer_types[i] == INDEXED and self.indexer_types[i] == index_share.SHARED:
                need(i > 0 and self.has_indexer(i - 1),
                     f"indexer_types[{i}] is 'shared' but layer {i - 1} is not a full DSA layer "
                     "(transformers passes top-k only from a full DSA layer to the next layer)")

    # --- HF config.json ---------------------------------------------------------------
    def to_hf_text_dict(self) -> dict:
        """The `text_config` transformers' Glm5NextTextConfig reads (and writes) for this config."""
        d = dataclasses.asdict(self)
        d.pop("vision_config")
        d.update(model_type=self.text_model_type, head_dim=self.qk_rope_head_dim, qk_head_dim=self.qk_head_dim,
                 layer_types=list(self.layer_types), mlp_layer_types=list(self.mlp_layer_types),
                 indexer_types=list(self.indexer_types))
        return d

    def to_hf_dict(self) -> dict:
        """A `glm5_next` config.json with this text config (transformers fills its vision defaults)."""
        d = {"model_type": self.model_type, "architectures": list(self.architectures),
             "text_config": self.to_hf_text_dict(), "tie_word_embeddings": False}
        return d | ({"vision_config": self.vision_config} if self.vision_config is not None else {})

    @classmethod
    def from_hf_dict(cls, d: dict) -> "GLM5FlashConfig":
        model_type = d.get("model_type", cls.model_type)
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config.json has model_type={model_type!r}, expected one of {MODEL_TYPES}")
        vision = d.get("vision_config") if model_type == cls.model_type else None
        if model_type == cls.model_type and d.get("text_config") is not None:
            d = d["text_config"]
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and (v is not None or k in _NULLABLE)}
        kwargs.pop("layer_types", None), kwargs.pop("mlp_layer_types", None), kwargs.pop("indexer_types", None)
        if "dtype" in d and "torch_dtype" not in d:
            kwargs["torch_dtype"] = d["dtype"]
        if (linear := d.get("linear_attn_config")) is not None:  # transformers' legacy dict, read as it reads it
            kwargs.update({ours: linear[theirs] for ours, theirs in (
                ("linear_head_dim", "head_dim"), ("linear_num_heads", "num_heads"),
                ("linear_conv_kernel_dim", "short_conv_kernel_size"), ("linear_lower_bound", "gate_lower_bound"))
                if theirs in linear})
            if linear.get("safe_gate", True) and kwargs.get("linear_lower_bound") is None:
                kwargs["linear_lower_bound"] = -5.0
        n = kwargs.get("num_hidden_layers", cls.num_hidden_layers)
        if d.get("layer_types") is not None:
            kwargs["layer_types"] = tuple(d["layer_types"])
        if d.get("mlp_layer_types") is not None:
            kwargs["mlp_layer_types"] = tuple(d["mlp_layer_types"])
        kwargs["indexer_types"] = tuple(index_share.hf_indexer_types(d, n))
        kwargs.pop("vision_config", None)
        return cls(**kwargs, vision_config=vision)

    @classmethod
    def load_hf_json(cls, path: str | Path) -> "GLM5FlashConfig":
        from model.config import read_hf_json

        return cls.from_hf_dict(read_hf_json(path))

    def replace(self, **changes) -> "GLM5FlashConfig":
        return dataclasses.replace(self, **changes)


NOT_YET = ("GLM-5.3-Flash (glm5_next) is read by model/config_flash.py (GLM5FlashConfig) and built by "
           "model/specs_flash.py; this GLM-5 path (GLM5Config, glm_moe_dsa) does not take it")


def is_flash(config: dict) -> bool:
    """Whether an HF config dict (a config.json, a checkpoint's model_config) is GLM-5.3-Flash's."""
    return config.get("model_type") in MODEL_TYPES


def config_from_hf_dict(config: dict):
    """The family's config an HF config dict describes: GLM5FlashConfig for glm5_next, else GLM5Config."""
    from model.config import GLM5Config

    return GLM5FlashConfig.from_hf_dict(config) if is_flash(config) else GLM5Config.from_hf_dict(config)


def refuse_to_build(where: str) -> ValueError:
    return ValueError(f"{where}: {NOT_YET}")
