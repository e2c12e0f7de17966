"""Our megatron-core GLM-5 tensors <-> Hugging Face `glm_moe_dsa` tensors: names and transforms.

One declarative table (wildcard names, like Megatron-Bridge's `mapping_registry`) plus a few named
transforms; `tools/export_hf.py` and `tools/import_hf.py` both read it, so the two directions
cannot drift apart. The facts behind every entry are in docs/HF_MAPPING.md (what each side computes,
D1-D6) and docs/EXPORT.md (the name map).

Megatron names here are *logical*: what one parameter is called in a single-process model in
HybridModel's layout (model/key_layout.py: a GLM layer i is hybrid layers 2i and 2i+1), except
that routed experts are `mlp.experts.{E}.linear_fc1.weight` with the global expert index E. On disk
(dist_checkpointing) routed experts of a layer are stacked on a leading expert axis under
`mlp.experts.experts.linear_fc1.weight` (SequentialMLP and TE's GroupedMLP write the same key), and a
GLU fc1 is stored as [gate; up] whatever the TP layout: `storage_key`/`logical_name` translate.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass

import torch

from model import key_layout
from model.config import GLM5Config


@dataclass(frozen=True)
class Dims:
    """The sizes the transforms need. `padded_vocab_size` is the megatron side's row count of the
    embedding and output layer (padded for TP; it is whatever the checkpoint or model has)."""

    vocab_size: int
    padded_vocab_size: int
    index_n_heads: int
    index_head_dim: int
    rope_dim: int

    @classmethod
    def of(cls, cfg: GLM5Config, padded_vocab_size: int) -> "Dims":
        return cls(cfg.vocab_size, padded_vocab_size, cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim)


# --- named transforms (megatron tensor <-> list of HF tensors) ------------------------------------------
class Transform:
    name = "identity"

    def to_hf(self, t: torch.Tensor, d: Dims) -> list[torch.Tensor]:
        return [t]

    def to_megatron(self, ts: list[torch.Tensor], d: Dims) -> torch.Tensor:
        return ts[0]

    def hf_shapes(self, shape: tuple[int, ...], d: Dims) -> list[tuple[int, ...]]:
        return [tuple(shape)]


class VocabRows(Transform):
    """Megatron pads the vocabulary to a multiple of --make-vocab-size-divisible-by x TP; HF has exactly
    vocab_size rows."""

    name = "vocab_rows"

    def to_hf(self, t, d):
        return [t[: d.vocab_size]]

    def to_megatron(self, ts, d):
        (t,) = ts
        return torch.cat([t, t.new_zeros(d.padded_vocab_size - t.shape[0], *t.shape[1:])])

    def hf_shapes(self, shape, d):
        return [(d.vocab_size, *shape[1:])]


class IndexerRopeFirst(Transform):
    """Checkpoints of format 1 (before INDEXER_ROPE_FIRST_SINCE) keep each DSA indexer head as
    [nope | rope]; transformers and megatron-core 0.19.2 (so this project since) as [rope | nope]:
    rotate each head's dims by rope_dim. Applies to wq_b's rows per head, wk's rows, and k_norm's
    weight and bias (LayerNorm statistics are permutation-invariant). `to_hf` is also the upgrade
    of a format-1 tensor to today's layout (pretrain/checkpoint/upgrade.py)."""

    name = "indexer_rope_first"

    def __init__(self, per_head: bool):
        self.per_head = per_head

    def _roll(self, t, d, shift):
        heads = d.index_n_heads if self.per_head else 1
        return torch.roll(t.reshape(heads, d.index_head_dim, -1), shift, dims=1).reshape(t.shape)

    def to_hf(self, t, d):
        return [self._roll(t, d, d.rope_dim)]

    def to_megatron(self, ts, d):
        return self._roll(ts[0], d, -d.rope_dim)


class GluSplit(Transform):
    """A SwiGLU fc1 is [gate; up] in megatron (dist_checkpointing keeps that order for any TP);
    HF has separate gate_proj and up_proj."""

    name = "glu_split"

    def to_hf(self, t, d):
        gate, up = t.chunk(2, dim=0)
        return [gate, up]

    def to_megatron(self, ts, d):
        return torch.cat(ts, dim=0)

    def hf_shapes(self, shape, d):
        half = (shape[0] // 2, *shape[1:])
        return [half, half]


IDENTITY, VOCAB, GLU = Transform(), VocabRows(), GluSplit()
ROPE_FIRST_PER_HEAD, ROPE_FIRST = IndexerRopeFirst(per_head=True), IndexerRopeFirst(per_head=False)
# The checkpoint format (pretrain/checkpoint/run_state.py FORMAT_VERSION) from which the indexer is stored as
# transformers and megatron-core keep it: its tensors map to HF unchanged.
INDEXER_ROPE_FIRST_SINCE = 2

# --- the name map -----------------------------------------------------------------------------------
# (megatron, HF, transform). In layer rules the names are relative to a layer; `*` is the expert.
_IDX = "self_attention.core_attention.indexer."
ATTENTION = [
    ("input_layernorm.weight", "input_layernorm.weight", IDENTITY),
    ("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight", IDENTITY),
    ("self_attention.q_layernorm.weight", "self_attn.q_a_layernorm.weight", IDENTITY),  # separate norm: D1
    ("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight", IDENTITY),
    ("self_attention.linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight", IDENTITY),
    ("self_attention.kv_layernorm.weight", "self_attn.kv_a_layernorm.weight", IDENTITY),
    ("self_attention.linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight", IDENTITY),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight", IDENTITY),
    (_IDX + "linear_wq_b.weight", "self_attn.indexer.wq_b.weight", IDENTITY),
    (_IDX + "linear_wk.weight", "self_attn.indexer.wk.weight", IDENTITY),
    (_IDX + "k_norm.weight", "self_attn.indexer.k_norm.weight", IDENTITY),
    (_IDX + "k_norm.bias", "self_attn.indexer.k_norm.bias", IDENTITY),
    (_IDX + "linear_weights_proj.weight", "self_attn.indexer.weights_proj.weight", IDENTITY),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", IDENTITY),
]
DENSE_MLP = [
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GLU),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight", IDENTITY),
]
MOE = [
    ("mlp.router.weight", "mlp.gate.weight", IDENTITY),
    ("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias", IDENTITY),  # the noaux_tc bias
    ("mlp.shared_experts.linear_fc1.weight", ("mlp.shared_experts.gate_proj.weight",
                                              "mlp.shared_experts.up_proj.weight"), GLU),
    ("mlp.shared_experts.linear_fc2.weight", "mlp.shared_experts.down_proj.weight", IDENTITY),
]
EXPERT = [  # per routed expert, written per expert on disk as GLM-5 ships (transformers fuses on load)
    ("mlp.experts.*.linear_fc1.weight", ("mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"), GLU),
    ("mlp.experts.*.linear_fc2.weight", "mlp.experts.*.down_proj.weight", IDENTITY),
]
# The MTP layer is HF layer num_hidden_layers (+ j); it shares the embedding and output head.
MTP = [
    ("enorm.weight", "enorm.weight", IDENTITY),
    ("hnorm.weight", "hnorm.weight", IDENTITY),
    ("eh_proj.weight", "eh_proj.weight", IDENTITY),  # columns [embedding | hidden] in both
    ("final_layernorm.weight", "shared_head.norm.weight", IDENTITY),
]
# A format-1 checkpoint's indexer tensors (by name suffix) and the transform to today's layout.
LEGACY_INDEXER = {_IDX + "linear_wq_b.weight": ROPE_FIRST_PER_HEAD, _IDX + "linear_wk.weight": ROPE_FIRST,
                  _IDX + "k_norm.weight": ROPE_FIRST, _IDX + "k_norm.bias": ROPE_FIRST}


def legacy_indexer_transform(name: str, checkpoint_format: int | None) -> Transform | None:
    """The transform a tensor named `name` (a model or optimizer-state key) of a checkpoint of
    `checkpoint_format` needs to reach today's layout, or None."""
    if checkpoint_format is None or checkpoint_format >= INDEXER_ROPE_FIRST_SINCE:
        return None
    return next((t for suffix, t in LEGACY_INDEXER.items() if name.endswith(suffix)), None)


EMBEDDING = ("embedding.word_embeddings.weight", "model.embed_tokens.weight", VOCAB)
FINAL = [("decoder.final_layernorm.weight", "model.norm.weight", IDENTITY),
         ("output_layer.weight", "lm_head.weight", VOCAB)]  # untied (tie_word_embeddings=false)

# Stored in fp32 whatever the export dtype (HF keeps it fp32 on load: _keep_in_fp32_modules_strict).
KEEP_FP32 = ("model.layers.*.mlp.gate.e_score_correction_bias",)
# 2-D weights GLM-5-FP8 leaves unquantized (norms and biases are 1-D and never quantized).
NOT_FP8 = ("model.embed_tokens.weight", "lm_head.weight", "model.layers.*.mlp.gate.weight",
           "model.layers.*.self_attn.indexer.weights_proj.weight")


@dataclass(frozen=True)
class Conversion:
    megatron: str               # logical megatron name
    hf: tuple[str, ...]         # the HF tensors it becomes
    transform: Transform


def _layer(m_prefix: str, h_prefix: str, rules, expert: int | None = None) -> list[Conversion]:
    out = []
    for m, h, t in rules:
        hs = (h,) if isinstance(h, str) else h
        if expert is not None:
            m, hs = m.replace("*", str(expert)), tuple(x.replace("*", str(expert)) for x in hs)
        out.append(Conversion(m_prefix + m, tuple(h_prefix + x for x in hs), t))
    return out


def _block(cfg: GLM5Config, m_prefix: str, h_prefix: str, moe: bool, indexer: bool = True) -> list[Conversion]:
    # an IndexShare "shared" layer has no indexer tensors on either side (transformers builds none)
    out = _layer(m_prefix, h_prefix, ATTENTION if indexer else [r for r in ATTENTION if not r[0].startswith(_IDX)])
    if not moe:
        return out + _layer(m_prefix, h_prefix, DENSE_MLP)
    out += _layer(m_prefix, h_prefix, MOE)
    for e in range(cfg.n_routed_experts):
        out += _layer(m_prefix, h_prefix, EXPERT, expert=e)
    return out


def conversions(cfg: GLM5Config, checkpoint_format: int | None = None) -> list[Conversion]:
    """Every tensor of the model, in HF order: embeddings, layers 0.., the MTP layer(s), norm, head.
    `checkpoint_format`: of the megatron tensors, when they come from a checkpoint older than today's."""
    out = _conversions(cfg)
    return [dataclasses.replace(c, transform=legacy_indexer_transform(c.megatron, checkpoint_format) or c.transform)
            for c in out]


def _conversions(cfg: GLM5Config) -> list[Conversion]:
    """The table written in GPTModel's names (one TransformerLayer per GLM layer), renamed to HybridModel's."""
    return [dataclasses.replace(c, megatron=key_layout.to_hybrid(c.megatron)) for c in _gpt_conversions(cfg)]


def _gpt_conversions(cfg: GLM5Config) -> list[Conversion]:
    out = [Conversion(EMBEDDING[0], (EMBEDDING[1],), EMBEDDING[2])]
    for i in range(cfg.num_hidden_layers):
        out += _block(cfg, f"decoder.layers.{i}.", f"model.layers.{i}.", cfg.is_moe_layer(i), cfg.has_indexer(i))
    for j in range(cfg.num_nextn_predict_layers):
        m, h = f"mtp.layers.{j}.", f"model.layers.{cfg.num_hidden_layers + j}."
        out += _layer(m, h, MTP)
        out += _block(cfg, m + "transformer_layer.", h, moe=True)  # the MTP layer uses the last layer's spec
    out += [Conversion(m, (h,), t) for m, h, t in FINAL]
    return out


# --- dtype policy of the HF files ---------------------------------------------------------------------
def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def keeps_fp32(hf_name: str) -> bool:
    return _matches(hf_name, KEEP_FP32)


def fp8_quantized(hf_name: str, ndim: int) -> bool:
    return ndim == 2 and not _matches(hf_name, NOT_FP8)


def scale_name(hf_name: str) -> str:
    """The FP8 releases' per-block scale of a quantized weight."""
    return hf_name[: -len("weight")] + "weight_scale_inv"


# --- logical megatron names <-> dist_checkpointing keys -----------------------------------------------
_EXPERT_LOGICAL = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(linear_fc[12]\.weight)$")
_EXPERT_STORED = re.compile(r"^(.*\.mlp\.experts\.)experts\.(linear_fc[12]\.weight)$")


def storage_key(logical: str) -> tuple[str, int | None]:
    """(dist_checkpointing key, index on its leading expert axis or None)."""
    m = _EXPERT_LOGICAL.match(logical)
    if m:
        return f"{m.group(1)}experts.{m.group(3)}", int(m.group(2))
    return logical, None


def is_stacked_experts(key: str) -> bool:
    return _EXPERT_STORED.match(key) is not None


def logical_name(key: str, expert: int | None = None) -> str:
    m = _EXPERT_STORED.match(key)
    if m:
        if expert is None:
            raise ValueError(f"{key} stacks the routed experts: an expert index is needed")
        return f"{m.group(1)}{expert}.{m.group(2)}"
    return key
