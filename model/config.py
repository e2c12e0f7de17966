"""GLM-5 model configuration, with Hugging Face field names.

One dataclass describes the architecture; its fields are exactly the ones in the HF
`config.json` of `GlmMoeDsaForCausalLM` (docs/HF_MAPPING.md, section 1), so a config
round-trips through `to_hf_dict`/`from_hf_dict` and the exporter writes it unchanged.
Run-time choices (parallel layout, precision, loss weights) live elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from model import index_share


_NONE_MEANS_DEFAULT = {"rope_interleave", "indexer_rope_interleave", "topk_method", "rope_theta"}


def _rope_theta(d: dict) -> float | None:
    """rope_theta from an HF config: plain RoPE only. A scaled RoPE (yarn, linear, ...) is refused, not dropped."""
    params = d.get("rope_parameters")
    if d.get("rope_scaling") not in (None, {}):
        raise ValueError(f"GLM5Config: rope_scaling={d['rope_scaling']!r}: only plain RoPE is supported")
    if params is None:
        return d.get("rope_theta")
    if not isinstance(params, dict):
        raise ValueError(f"GLM5Config: rope_parameters={params!r} is not a dict")
    if params.get("rope_type", "default") != "default" or set(params) - {"rope_type", "rope_theta"}:
        raise ValueError(f"GLM5Config: rope_parameters={params!r}: only plain RoPE "
                         "({'rope_type': 'default', 'rope_theta': ...}) is supported")
    theta = params.get("rope_theta", d.get("rope_theta"))
    if d.get("rope_theta") is not None and theta != d["rope_theta"]:
        raise ValueError(f"GLM5Config: rope_theta={d['rope_theta']!r} disagrees with rope_parameters={params!r}")
    return theta


def read_hf_json(path: str | Path) -> dict:
    """An HF config.json (or the directory holding one), errors naming the file."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no HF config at {p}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


DEFAULT_VOCAB_DIVISIBLE_BY = 128  # Megatron-LM's --make-vocab-size-divisible-by default


def padded_vocab_size(vocab_size: int, *, divisible_by: int, tp: int) -> int:
    """Megatron-LM's padding of the embedding and output layer: the next multiple of
    --make-vocab-size-divisible-by x TP, so each tensor-parallel rank holds whole, equal rows."""
    if vocab_size <= 0 or divisible_by <= 0:
        raise ValueError(f"--vocab-size {vocab_size} and --make-vocab-size-divisible-by {divisible_by} "
                         "must be positive")
    unit = divisible_by * tp
    return -(-vocab_size // unit) * unit


@dataclass
class GLM5Config:
    vocab_size: int = 154880
    hidden_size: int = 6144
    intermediate_size: int = 12288  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 78
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 3
    q_lora_rank: int = 2048
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 192
    qk_rope_head_dim: int = 64
    v_head_dim: int = 256
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 32
    indexer_rope_interleave: bool = True
    rope_interleave: bool = True
    rope_theta: float = 1e6
    max_position_embeddings: int = 202752
    num_nextn_predict_layers: int = 1
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    eos_token_id: list[int] | int | None = field(default_factory=lambda: [154820, 154827, 154829])
    pad_token_id: int | None = 154820
    bos_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    # IndexShare (GLM-5.1/5.2, model/index_share.py): "full"/"shared" per decoder layer; None = all full
    indexer_types: tuple[str, ...] | None = None

    # HF constants this config does not vary (written to config.json as-is).
    model_type = "glm_moe_dsa"
    architectures = ("GlmMoeDsaForCausalLM",)

    def __post_init__(self):
        if self.indexer_types is not None:
            types = tuple(self.indexer_types)
            index_share.check(types, self.num_hidden_layers)
            # all full is GLM-5's default: stored as None so GLM-5 configs stay equal and resizable
            self.indexer_types = None if all(t == index_share.FULL for t in types) else types
        self.validate()

    # --- derived sizes ----------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def layer_indexer_types(self) -> list[str]:
        """transformers' `indexer_types`: "full" or "shared" for each decoder layer (0-based)."""
        return list(self.indexer_types or [index_share.FULL] * self.num_hidden_layers)

    @property
    def shares_top_k(self) -> bool:
        return self.indexer_types is not None

    def has_indexer(self, layer_index: int) -> bool:
        """0-based decoder layer index; the MTP layer (index >= num_hidden_layers) runs its own."""
        return layer_index >= self.num_hidden_layers or self.layer_indexer_types[layer_index] == index_share.FULL

    def mtp_depths(self, mtp_num_layers: int | None = None) -> int:
        """How many future tokens the MTP module predicts: --mtp-num-layers, else one per MTP layer of
        the config. The parameters (and the checkpoint) hold `num_nextn_predict_layers` layers either way:
        with --mtp-use-repeated-layer the one layer is applied at every depth."""
        return self.num_nextn_predict_layers if mtp_num_layers is None else mtp_num_layers

    def is_moe_layer(self, layer_index: int) -> bool:
        """0-based decoder layer index; the MTP layer (index num_hidden_layers) is MoE."""
        return layer_index >= self.first_k_dense_replace

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"GLM5Config: {msg}")

        need(self.scoring_func == "sigmoid", f"scoring_func={self.scoring_func!r}: only 'sigmoid' is supported")
        need(self.n_group == 1 and self.topk_group == 1, "group-limited routing (n_group/topk_group > 1) is not supported")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace={self.first_k_dense_replace} must be within [0, num_hidden_layers={self.num_hidden_layers}]")
        need(self.num_experts_per_tok <= self.n_routed_experts,
             f"num_experts_per_tok={self.num_experts_per_tok} > n_routed_experts={self.n_routed_experts}")
        need(self.num_key_value_heads == self.num_attention_heads,
             "MLA needs num_key_value_heads == num_attention_heads")
        need(self.index_head_dim > self.qk_rope_head_dim,
             f"index_head_dim={self.index_head_dim} must exceed qk_rope_head_dim={self.qk_rope_head_dim}")
        need(self.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers must be 0 or 1")
        need(not self.tie_word_embeddings, "GLM-5 unties embeddings and output head (tie_word_embeddings=false)")
        need(self.hidden_act == "silu", "hidden_act must be 'silu' (SwiGLU)")
        # Parsed HF fields the model implements one way only: anything else would be silently ignored.
        need(self.norm_topk_prob is True, f"norm_topk_prob={self.norm_topk_prob!r}: megatron-core's sigmoid "
             "routing always normalizes the top-k scores (only true is supported)")
        need(self.topk_method == "noaux_tc", f"topk_method={self.topk_method!r}: only 'noaux_tc' (aux-loss-free "
             "expert bias) is supported")
        need(self.rope_interleave is True, f"rope_interleave={self.rope_interleave!r}: MLA rotates interleaved "
             "pairs (only true is supported)")
        need(self.indexer_rope_interleave is True, f"indexer_rope_interleave={self.indexer_rope_interleave!r}: "
             "the DSA indexer rotates interleaved pairs (only true is supported)")
        need(self.attention_bias is False, f"attention_bias={self.attention_bias!r}: the attention linears have "
             "no bias (only false is supported)")

    # --- HF config.json ---------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_type"] = self.model_type
        d["architectures"] = list(self.architectures)
        d["head_dim"] = self.qk_rope_head_dim  # what HF stores (it overwrites head_dim with the rope dim)
        d["qk_head_dim"] = self.qk_head_dim
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        # transformers reads the list before index_topk_freq / index_topk_pattern (docs/HF_MAPPING.md, D4)
        d["indexer_types"] = self.layer_indexer_types
        d["mlp_layer_types"] = (["dense"] * self.first_k_dense_replace
                                + ["sparse"] * self.num_moe_layers)
        d["use_cache"] = True
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "GLM5Config":
        from model.config_flash import is_flash, refuse_to_build

        if is_flash(d):

            raise refuse_to_build(f"config.json has model_type={d['model_type']!r}")
        if d.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"config.json has model_type={d.get('model_type')!r}, expected {cls.model_type!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        # transformers writes None for the fields its config class does not define (it hard-codes them).
        kwargs = {k: v for k, v in d.items() if k in known and not (v is None and k in _NONE_MEANS_DEFAULT)}
        theta = _rope_theta(d)
        if theta is not None:
            kwargs["rope_theta"] = theta
        if "dtype" in d and "torch_dtype" not in d:
            kwargs["torch_dtype"] = d["dtype"]
        if d.get("index_share_for_mtp_iteration"):
            # the MTP layer runs its own indexer here, as megatron-core's (transformers builds no MTP layer)
            raise ValueError("GLM5Config: index_share_for_mtp_iteration=true (the MTP layer reusing the last "
                             "decoder layer's top-k) is not supported: the MTP layer runs its own indexer")
        layers = kwargs.get("num_hidden_layers", cls.num_hidden_layers)
        kwargs["indexer_types"] = tuple(index_share.hf_indexer_types(d, layers))
        return cls(**kwargs)

    def save_hf_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_hf_json(cls, path: str | Path) -> "GLM5Config":
        return cls.from_hf_dict(read_hf_json(path))

    def replace(self, **changes) -> "GLM5Config":
        return dataclasses.replace(self, **changes)
