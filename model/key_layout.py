"""The two checkpoint key layouts of the GLM-5 family, and the one mapping between them.

megatron-core's GPTModel (this project before issue 36, tests/fixtures/mcore016, Megatron-Bridge 0.6.2)
keeps a GLM layer whole: `decoder.layers.{i}.{input_layernorm,self_attention,pre_mlp_layernorm,mlp}`,
`decoder.final_layernorm`, and the MTP layer's inner layer at `mtp.layers.{j}.transformer_layer.`
(its module is `mtp_model_layer`; 0.19.2's sharded_state_dict renames it). HybridModel splits each GLM
layer into two hybrid layers (model/layer_pattern.py): the attention half `D` at `decoder.layers.{2i}`,
the MLP or MoE half at `decoder.layers.{2i+1}`, `decoder.final_norm`, and the MTP inner stack at
`mtp.layers.{j}.mtp_model_layer.layers.{0,1}.`

`to_hybrid` / `to_gpt` translate one key either way; they work on any string that contains such a
key (a model's state_dict name, a dist_checkpointing key, an optimizer-state key that ends in one).
upstream's `dist_checkpointing/gpt_checkpoint_interop.py` refuses GLM-5 (DSA layers, MTP, mixed
dense/MoE), hence this module.
"""

from __future__ import annotations

import re

GPT, HYBRID = "gpt", "hybrid"

# the two halves of a TransformerLayer: what stays on the attention layer, what goes to the MLP one
_ATTENTION_PARTS = ("input_layernorm", "self_attention", "self_attn_bda")
_MLP_PARTS = ("pre_mlp_layernorm", "mlp", "mlp_bda")
_PARTS = "|".join(_ATTENTION_PARTS + _MLP_PARTS)

_GPT_LAYER = re.compile(rf"(^|\.)decoder\.layers\.(\d+)\.({_PARTS})(\.|$)")
_GPT_MTP = re.compile(rf"(^|\.)mtp\.layers\.(\d+)\.(?:transformer_layer|mtp_model_layer)\.({_PARTS})(\.|$)")
_HYBRID_LAYER = re.compile(rf"(^|\.)decoder\.layers\.(\d+)\.({_PARTS})(\.|$)")
_HYBRID_MTP = re.compile(rf"(^|\.)mtp\.layers\.(\d+)\.mtp_model_layer\.layers\.([01])\.({_PARTS})(\.|$)")
_GPT_FINAL, _HYBRID_FINAL = "decoder.final_layernorm.", "decoder.final_norm."


def _half(part: str) -> int:
    return 0 if part in _ATTENTION_PARTS else 1


def to_hybrid(key: str) -> str:
    """A GPTModel-layout key -> HybridModel's (keys of neither layout pass unchanged)."""
    key = _GPT_LAYER.sub(lambda m: f"{m[1]}decoder.layers.{2 * int(m[2]) + _half(m[3])}.{m[3]}{m[4]}", key)
    key = _GPT_MTP.sub(lambda m: f"{m[1]}mtp.layers.{m[2]}.mtp_model_layer.layers.{_half(m[3])}.{m[3]}{m[4]}", key)
    return _replace_final(key, _GPT_FINAL, _HYBRID_FINAL)


def to_gpt(key: str, mtp_module: str = "transformer_layer") -> str:
    """A HybridModel-layout key -> GPTModel's. `mtp_module`: "transformer_layer" gives GPTModel's
    checkpoint key of the MTP inner layer, "mtp_model_layer" its module (state_dict) name."""

    def layer(m):
        number, part = int(m[2]), m[3]
        if number % 2 != _half(part):
            raise ValueError(f"{key}: hybrid layer {number} holds {part}, which GLM-5's pattern puts on "
                             f"{'even' if _half(part) == 0 else 'odd'} layers")
        return f"{m[1]}decoder.layers.{number // 2}.{part}{m[4]}"

    def mtp(m):
        if int(m[3]) != _half(m[4]):
            raise ValueError(f"{key}: MTP inner layer {m[3]} holds {m[4]}")
        return f"{m[1]}mtp.layers.{m[2]}.{mtp_module}.{m[4]}{m[5]}"

    key = _HYBRID_MTP.sub(mtp, key)
    key = _HYBRID_LAYER.sub(layer, key)
    return _replace_final(key, _HYBRID_FINAL, _GPT_FINAL)


def _replace_final(key: str, old: str, new: str) -> str:
    i = key.find(old)
    return key if i < 0 or (i > 0 and key[i - 1] != ".") else key[:i] + new + key[i + len(old):]


def layout_of(keys) -> str | None:
    """GPT or HYBRID from a checkpoint's keys (by the final norm and the MTP inner layer, the keys
    whose names differ; per-layer indices alone do not tell), None when none of them says."""
    keys = list(keys)
    if any(_HYBRID_FINAL in k or _HYBRID_MTP.search(k) for k in keys):
        return HYBRID
    if any(_GPT_FINAL in k or _GPT_MTP.search(k) for k in keys):
        return GPT
    return None
