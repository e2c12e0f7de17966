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


# --- the whole text model: transformers' Glm5NextTextModel (+ lm_head) <-> our HybridModel -----------------
# (model/specs_flash.py: GLM layer i is hybrid layers 2i, its mixer, and 2i + 1, its MLP / MoE)
_MLA_RENAMES = {
    "q_a_proj.weight": "linear_q_down_proj.weight",
    "q_a_layernorm.weight": "q_layernorm.weight",
    "q_b_proj.weight": "linear_q_up_proj.weight",
    "kv_a_proj_with_mqa.weight": "linear_kv_down_proj.weight",
    "kv_a_layernorm.weight": "kv_layernorm.weight",
    "kv_b_proj.weight": "linear_kv_up_proj.weight",
    "o_proj.weight": "linear_proj.weight",
}
_MLP_RENAMES = {"down_proj.weight": "linear_fc2.weight"}


def _under(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def mlp_from_hf(sd: dict) -> dict:
    return {"linear_fc1.weight": torch.cat([sd["gate_proj.weight"], sd["up_proj.weight"]]),
            "linear_fc2.weight": sd["down_proj.weight"]}


def mlp_to_hf(sd: dict) -> dict:
    gate, up = sd["linear_fc1.weight"].chunk(2)
    return {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": sd["linear_fc2.weight"]}


def moe_from_hf(sd: dict) -> dict:
    """transformers' Glm5NextTextMoE (fused experts [E, 2 x ffn, hidden] as [gate; up]) -> megatron's MoELayer
    with SequentialMLP experts (their fc1 is [gate; up] too)."""
    ours = {"router.weight": sd["gate.weight"], "router.expert_bias": sd["gate.e_score_correction_bias"],
            **_prefixed(mlp_from_hf(_under(sd, "shared_experts.")), "shared_experts.")}
    for e in range(sd["experts.gate_up_proj"].shape[0]):
        ours[f"experts.local_experts.{e}.linear_fc1.weight"] = sd["experts.gate_up_proj"][e]
        ours[f"experts.local_experts.{e}.linear_fc2.weight"] = sd["experts.down_proj"][e]
    return ours


def moe_to_hf(sd: dict) -> dict:
    experts = sorted({int(k.split(".")[2]) for k in sd if k.startswith("experts.local_experts.")})
    return {"gate.weight": sd["router.weight"], "gate.e_score_correction_bias": sd["router.expert_bias"],
            **_prefixed(mlp_to_hf(_under(sd, "shared_experts.")), "shared_experts."),
            "experts.gate_up_proj": torch.stack([sd[f"experts.local_experts.{e}.linear_fc1.weight"] for e in experts]),
            "experts.down_proj": torch.stack([sd[f"experts.local_experts.{e}.linear_fc2.weight"] for e in experts])}


def _vocab_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t[:rows]


def hybrid_from_hf(sd: dict, cfg, padded_vocab_size: int) -> dict:
    """transformers' text weights (Glm5NextTextModel's names, plus `lm_head.weight`) -> our HybridModel's
    state dict (EP 1: every routed expert local). The vocabulary rows are padded to `padded_vocab_size`."""
    ours = {"embedding.word_embeddings.weight": _vocab_rows(sd["embed_tokens.weight"], padded_vocab_size),
            "decoder.final_norm.weight": sd["norm.weight"],
            "output_layer.weight": _vocab_rows(sd["lm_head.weight"], padded_vocab_size)}
    for i in range(cfg.num_hidden_layers):
        layer = _under(sd, f"layers.{i}.")
        mixer, mlp = f"decoder.layers.{2 * i}.", f"decoder.layers.{2 * i + 1}."
        attn = _under(layer, "self_attn.")
        if cfg.is_linear_layer(i):
            block = kda_from_hf(attn)
        else:
            block = {**_renamed(attn, _MLA_RENAMES),
                     **_prefixed(indexer_from_hf(_under(attn, "indexer.")), "core_attention.indexer.")}
        ours |= _prefixed(hc_from_hf(_under(layer, "attn_hc.")), mixer + "hyper_connection.")
        ours |= {mixer + "input_layernorm.weight": layer["input_layernorm.weight"]}
        ours |= _prefixed(block, mixer + "self_attention.")
        ours |= _prefixed(hc_from_hf(_under(layer, "ffn_hc.")), mlp + "hyper_connection.")
        ours |= {mlp + "pre_mlp_layernorm.weight": layer["post_attention_layernorm.weight"]}
        ffn = (moe_from_hf if cfg.is_moe_layer(i) else mlp_from_hf)(_under(layer, "mlp."))
        ours |= _prefixed(ffn, mlp + "mlp.")
    return ours


def hybrid_to_hf(sd: dict, cfg) -> dict:
    """The inverse of `hybrid_from_hf`: our HybridModel's state dict (EP 1) -> transformers' text weights
    (Glm5NextTextModel's names and `lm_head.weight`), the vocabulary cut back to `cfg.vocab_size` rows."""
    v = cfg.vocab_size
    hf = {"embed_tokens.weight": sd["embedding.word_embeddings.weight"][:v], "norm.weight": sd["decoder.final_norm.weight"],
          "lm_head.weight": sd["output_layer.weight"][:v]}
    hc_back = {v_: k for k, v_ in _HC_RENAMES.items()}
    mla_back = {v_: k for k, v_ in _MLA_RENAMES.items()}
    idx_back = {v_: k for k, v_ in _INDEXER_RENAMES.items()}
    for i in range(cfg.num_hidden_layers):
        mixer, mlp, out = _under(sd, f"decoder.layers.{2 * i}."), _under(sd, f"decoder.layers.{2 * i + 1}."), {}
        attn = _under(mixer, "self_attention.")
        if cfg.is_linear_layer(i):
            out |= _prefixed(kda_to_hf(attn, cfg.linear_qkv_dim, cfg.linear_num_heads), "self_attn.")
        else:
            out |= {f"self_attn.{mla_back[k]}": attn[k] for k in mla_back}
            idx = _under(attn, "core_attention.indexer.")
            out |= {f"self_attn.indexer.{idx_back[k]}": idx[k] for k in idx_back}
        out |= {f"attn_hc.{hc_back[k]}": t for k, t in _under(mixer, "hyper_connection.").items()}
        out |= {f"ffn_hc.{hc_back[k]}": t for k, t in _under(mlp, "hyper_connection.").items()}
        out |= {"input_layernorm.weight": mixer["input_layernorm.weight"],
                "post_attention_layernorm.weight": mlp["pre_mlp_layernorm.weight"]}
        ffn = _under(mlp, "mlp.")
        out |= _prefixed(moe_to_hf(ffn) if cfg.is_moe_layer(i) else mlp_to_hf(ffn), "mlp.")
        hf |= _prefixed(out, f"layers.{i}.")
    return hf


# --- transformers' files <-> its modules: save_pretrained writes `glm5_next` under other names than its
# modules' (transformers' conversion_mapping.py "glm5_next": hc_attn_fn, f_a_proj, per-expert and per-q/k/v
# tensors); the two maps above speak the modules' names, the files are read and written through these ----
_FILE_RENAMES = [(f"hc_{blk}_{p}", f"{blk}_hc.{p}") for blk in ("attn", "ffn") for p in ("fn", "base", "scale")] + [
    (f"self_attn.{p}", f"self_attn.forget_gate.{p}") for p in ("f_a_proj.weight", "f_b_proj.weight", "dt_bias", "A_log")]
_CONVS = ("q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight")


def text_from_files(sd: dict) -> dict:
    """Text tensors as save_pretrained stores them (relative to `model.language_model.`) -> the modules' names."""
    out, experts = {}, {}
    for k, v in sd.items():
        layer, _, rest = k.partition(".mlp.experts.")
        if rest:  # "{e}.{gate,up,down}_proj.weight"
            e, proj = rest.split(".", 1)
            experts.setdefault(layer, {})[(int(e), proj)] = v
            continue
        for theirs, ours in _FILE_RENAMES:
            if k.endswith("." + theirs):
                k = k[: -len(theirs)] + ours
        out[k] = v
    for layer, tensors in experts.items():
        n = 1 + max(e for e, _ in tensors)
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[(e, "gate_proj.weight")], tensors[(e, "up_proj.weight")]]) for e in range(n)])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([tensors[(e, "down_proj.weight")] for e in range(n)])
    for k in [k for k in out if k.endswith("self_attn." + _CONVS[0])]:
        prefix = k[: -len(_CONVS[0])]
        out[prefix + "conv1d.weight"] = torch.cat([out.pop(prefix + c) for c in _CONVS])
    return out


def text_to_files(sd: dict) -> dict:
    """The inverse of `text_from_files`: the modules' names -> save_pretrained's."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".mlp.experts.gate_up_proj"):
            layer = k[: -len(".gate_up_proj")]
            for e, (gate, up) in enumerate(t.chunk(2) for t in v):
                out[f"{layer}.{e}.gate_proj.weight"], out[f"{layer}.{e}.up_proj.weight"] = gate, up
        elif k.endswith(".mlp.experts.down_proj"):
            layer = k[: -len(".down_proj")]
            out |= {f"{layer}.{e}.down_proj.weight": t for e, t in enumerate(v)}
        elif k.endswith("self_attn.conv1d.weight"):
            prefix = k[: -len("conv1d.weight")]
            out |= {prefix + c: t for c, t in zip(_CONVS, v.chunk(3))}
        else:
            for theirs, ours in _FILE_RENAMES:
                if k.endswith("." + ours):
                    k = k[: -len(ours)] + theirs
            out[k] = v
    return out
