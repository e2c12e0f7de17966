"""transformers' GLM-5.3-Flash (`glm5_next`) weights onto our modules, one submodule at a time.

Each function maps a state dict relative to transformers' submodule onto one relative to ours (and
back): the tests copy random weights across with them, and the importer/exporter will compose them
per layer once the HybridModel specs exist (issue 41).

- KDA: transformers' `self_attn.{q,k,v,b}_proj` are one `in_proj` here ([q | k | v | beta], as
  megatron-core's GatedDeltaNet fuses its input projections); the low-rank gates are renamed.
- mHC (`attn_hc`, `ffn_hc`): `fn`, `base`, `scale` are `weight`, `bias`, `scale`.
- Pooled indexer: megatron-core's DSAIndexer names (linear_wq_b, linear_wk, k_norm,
  linear_weights_proj) plus the k-pool's gate and position bias.
"""

from __future__ import annotations

import torch

_KDA_RENAMES = {
    "conv1d.weight": "conv1d.weight",
    "forget_gate.f_a_proj.weight": "linear_f_down_proj.weight",
    "forget_gate.f_b_proj.weight": "linear_f_up_proj.weight",
    "forget_gate.dt_bias": "dt_bias",
    "forget_gate.A_log": "A_log",
    "g_a_proj.weight": "linear_g_down_proj.weight",
    "g_b_proj.weight": "linear_g_up_proj.weight",
    "o_norm.weight": "out_norm.weight",
    "o_proj.weight": "out_proj.weight",
}
_KDA_FUSED = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "b_proj.weight")  # in_proj's row blocks

_HC_RENAMES = {"fn": "weight", "base": "bias", "scale": "scale"}

_INDEXER_RENAMES = {
    "wq_b.weight": "linear_wq_b.weight",
    "wk.weight": "linear_wk.weight",
    "k_norm.weight": "k_norm.weight",
    "k_norm.bias": "k_norm.bias",
    "weights_proj.weight": "linear_weights_proj.weight",
    "index_kpool_compress_gate": "kpool_gate",
    "index_kpool_compress_ape": "kpool_position_bias",
}


def _renamed(sd: dict, renames: dict) -> dict:
    missing = set(renames) - set(sd)
    if missing:
        raise KeyError(f"transformers' state dict lacks {sorted(missing)}")
    return {renames[k]: sd[k] for k in renames}


def kda_from_hf(sd: dict) -> dict:
    return {**_renamed(sd, _KDA_RENAMES), "in_proj.weight": torch.cat([sd[k] for k in _KDA_FUSED])}


def kda_to_hf(sd: dict, qkv_dim: int, num_heads: int) -> dict:
    blocks = sd["in_proj.weight"].split([qkv_dim] * 3 + [num_heads])
    back = {v: k for k, v in _KDA_RENAMES.items()}
    return {**{back[k]: sd[k] for k in back}, **dict(zip(_KDA_FUSED, blocks))}


def hc_from_hf(sd: dict) -> dict:
    return _renamed(sd, _HC_RENAMES)


def indexer_from_hf(sd: dict) -> dict:
    return _renamed(sd, _INDEXER_RENAMES)
