"""Megatron-Bridge 0.6.2's checkpoint layout, read and written (docs/INTEROP.md).

Bridge writes megatron-core's GPTModel keys in dist_checkpointing's torch_dist format, as we do; what
differs is the metadata beside the tensors:

    ROOT/latest_checkpointed_iteration.txt, ROOT/latest_train_state.pt
    ROOT/iter_0000000/run_config.yaml      Bridge's ConfigContainer; its `model` section builds the model
                     /train_state.pt       step, consumed samples, ... (tensors only)
                     /metadata.json, .metadata, __*_*.distcp

A Bridge checkpoint (run_config.yaml and no run_state.json) reads here as a weights-only checkpoint,
like an HF import: its model config comes from run_config.yaml's `model` section; its optimizer,
scheduler, data position and RNG are not taken over, and the load says so in one line. The yaml is
read with yaml.safe_load (data only: `_target_` entries are names to compare, never imported).
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import torch
import yaml

from model.config import GLM5Config

RUN_CONFIG = "run_config.yaml"
TRAIN_STATE = "train_state.pt"
LATEST_TRAIN_STATE = "latest_train_state.pt"
PROVIDER = "megatron.bridge.models.mla_provider.MLAModelProvider"
CONTAINER = "megatron.bridge.training.config.ConfigContainer"
CHECKPOINT = "megatron.bridge.training.config.CheckpointConfig"
# GLM5Bridge's block spec (megatron-core 0.19.2's DSA spec builder)
LAYER_SPEC = ("megatron.core.models.gpt.experimental_attention_variant_module_specs."
              "get_transformer_block_with_experimental_attention_variant_spec")
DTYPES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}

# HF config field -> Bridge provider field, where one is the other (Bridge's own HF config mapping)
SAME = (
    ("num_hidden_layers", "num_layers"), ("hidden_size", "hidden_size"), ("intermediate_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"), ("num_key_value_heads", "num_query_groups"),
    ("vocab_size", "vocab_size"), ("max_position_embeddings", "seq_length"), ("rms_norm_eps", "layernorm_epsilon"),
    ("initializer_range", "init_method_std"), ("attention_dropout", "attention_dropout"),
    ("tie_word_embeddings", "share_embeddings_and_output_weights"), ("attention_bias", "add_qkv_bias"),
    ("rope_theta", "rotary_base"), ("n_routed_experts", "num_moe_experts"), ("num_experts_per_tok", "moe_router_topk"),
    ("moe_intermediate_size", "moe_ffn_hidden_size"), ("scoring_func", "moe_router_score_function"),
    ("n_group", "moe_router_num_groups"), ("topk_group", "moe_router_group_topk"),
    ("routed_scaling_factor", "moe_router_topk_scaling_factor"), ("q_lora_rank", "q_lora_rank"),
    ("kv_lora_rank", "kv_lora_rank"), ("qk_nope_head_dim", "qk_head_dim"), ("qk_rope_head_dim", "qk_pos_emb_head_dim"),
    ("v_head_dim", "v_head_dim"), ("index_topk", "dsa_indexer_topk"), ("index_head_dim", "dsa_indexer_head_dim"),
    ("index_n_heads", "dsa_indexer_n_heads"), ("indexer_rope_interleave", "dsa_indexer_rope_interleaved"),
)
# What GLM5Bridge sets for every GLM-5 (provider_bridge), and our model computes: required on read, written
# as is. The DSA loss settings are run-time choices here (flags), written as GLM5Bridge's defaults.
FIXED = {
    "normalization": "RMSNorm", "gated_linear_unit": True, "add_bias_linear": False, "qk_layernorm": True,
    "multi_latent_attention": True, "experimental_attention_variant": "dsa", "moe_router_pre_softmax": True,
    "moe_router_enable_expert_bias": True, "dsa_indexer_topk_freq": 1, "dsa_indexer_skip_topk_offset": 0,
    "dsa_indexer_rotate_activation": False, "dsa_indexer_k_norm_epsilon": 1e-6, "rotary_scaling_factor": 1.0,
}
WRITTEN_AS_GLM5BRIDGE = {
    "moe_router_load_balancing_type": "seq_aux_loss", "moe_router_dtype": "fp32", "hidden_dropout": 0.0,
    "attention_softmax_in_fp32": False, "make_vocab_size_divisible_by": 1280, "mscale": 1.0, "mscale_all_dim": 1.0,
    "cp_comm_type": "allgather", "dsa_indexer_loss_coeff": 0.001, "dsa_indexer_use_sparse_loss": True,
}
# Where GLM5Bridge's choices need DeepEP or Transformer Engine (flex dispatcher, grouped GEMM, fused permute,
# shared-expert overlap): choices that load anywhere (the same weights and keys either way)
PORTABLE = {"moe_token_dispatcher_type": "alltoall", "moe_grouped_gemm": False, "moe_permute_fusion": False,
            "moe_shared_expert_overlap": False}


class BridgeFormatError(ValueError):
    pass


def is_bridge_iteration(directory: str | Path) -> bool:
    """Bridge's metadata and none of ours (ours would win: run_state.json is what this project writes)."""
    d = Path(directory)
    return (d / RUN_CONFIG).is_file() and not (d / "run_state.json").exists()


def read_run_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BridgeFormatError(f"{path}: not readable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise BridgeFormatError(f"{path}: no `model` section (not a Megatron-Bridge run_config.yaml)")
    return config


def _target(value) -> str | None:
    return value.get("_target_") if isinstance(value, dict) else None


def model_config(run_config: dict, where: str) -> GLM5Config:
    """Our model config of a Bridge `model` section; refuses, naming the field, what our model does not build."""
    m = run_config["model"]

    def need(field: str, ok: bool, why: str):
        if not ok:
            raise BridgeFormatError(f"{where}: model.{field}={m.get(field)!r}: {why}")

    missing = [bridge for _, bridge in SAME if bridge not in m]
    if missing:
        raise BridgeFormatError(f"{where}: the model section lacks {missing}")
    for field, value in FIXED.items():
        need(field, m.get(field) == value, f"this project builds GLM-5 with {value!r}")
    need("activation_func", _target(m.get("activation_func")) == "torch.nn.functional.silu", "SwiGLU (silu) only")
    freq = m.get("moe_layer_freq")
    layers = m.get("num_layers")
    if isinstance(freq, int):
        need("moe_layer_freq", freq == 1, "dense layers first, then MoE layers (a list, or 1)")
        dense = 0
    else:
        dense = freq.index(1) if isinstance(freq, list) and 1 in freq else -1
        need("moe_layer_freq", isinstance(freq, list) and len(freq) == layers and dense >= 0
             and freq == [0] * dense + [1] * (layers - dense), "dense layers first, then MoE layers")
    shared, expert = m.get("moe_shared_expert_intermediate_size") or 0, m.get("moe_ffn_hidden_size")
    need("moe_shared_expert_intermediate_size", bool(expert) and shared % expert == 0,
         f"a whole number of shared experts of moe_ffn_hidden_size {expert}")
    need("kv_channels", m.get("kv_channels") in (None, m.get("qk_pos_emb_head_dim")),
         "GLM-5's head_dim is its RoPE dim (qk_pos_emb_head_dim)")
    dtype = DTYPES.get(_target(m.get("params_dtype")) or "torch.float32")
    need("params_dtype", dtype is not None, f"one of {sorted(DTYPES)}")
    fields = {hf: m[bridge] for hf, bridge in SAME}
    try:
        return GLM5Config(**fields, first_k_dense_replace=dense, n_shared_experts=shared // expert,
                          num_nextn_predict_layers=m.get("mtp_num_layers") or 0, topk_method="noaux_tc",
                          hidden_act="silu", torch_dtype=dtype, rope_interleave=True,
                          eos_token_id=None, pad_token_id=None, bos_token_id=None)
    except (TypeError, ValueError) as e:
        raise BridgeFormatError(f"{where}: {e}") from None


# The fields of our model config that run_config.yaml determines and a --model-config must agree with: the
# architecture. Not the token ids (run_config.yaml does not hold them), nor what a Bridge recipe sets for its
# run (seq_length, which GLM5Bridge takes from max_position_embeddings; init std; dropout).
KNOWN_FIELDS = frozenset(hf for hf, _ in SAME) - {"max_position_embeddings", "initializer_range",
                                                  "attention_dropout"} | {
    "first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers", "topk_method", "hidden_act",
    "rope_interleave", "norm_topk_prob", "indexer_types"}


def _train_state(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: nothing runs
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        reason = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise BridgeFormatError(f"{path}: not a readable train state ({reason})") from None
    return {k: v.item() for k, v in state.items() if torch.is_tensor(v) and v.numel() == 1}


def run_state(root: str | Path, iteration: int) -> dict:
    """A Bridge iteration as this project's run_state.json would describe it: weights only, iteration 0, with
    `notes` (what is not taken over)."""
    from pretrain.checkpoint.run_state import FORMAT_VERSION, iter_dir

    directory = iter_dir(root, iteration)
    run_config = read_run_config(directory / RUN_CONFIG)
    cfg = model_config(run_config, str(directory / RUN_CONFIG))
    progress = _train_state(directory / TRAIN_STATE)
    saved_optim = (run_config.get("checkpoint") or {}).get("save_optim")
    optimizer = ("its optimizer state" if saved_optim else "no optimizer state (save_optim: false)") + " and scheduler"
    note = (f"Megatron-Bridge checkpoint {directory}: its model weights load, from iteration 0; not taken over: "
            f"{optimizer}, its step {progress.get('step', iteration)} and "
            f"{progress.get('consumed_train_samples', 0)} consumed samples, data position and RNG; the token ids "
            "(eos/pad/bos) are not in run_config.yaml (--model-config HF_DIR/config.json gives them)")
    return {"iteration": 0, "consumed_tokens": 0, "consumed_samples": 0, "model_config": cfg.to_hf_dict(),
            "layout": {}, "world_size": None, "format_version": FORMAT_VERSION, "weights_only": True,
            "source": {"megatron_bridge": str(directory)}, "notes": [note]}


def is_bridge_state(saved: dict) -> bool:
    return "megatron_bridge" in (saved.get("source") or {})


def config_differences(saved: dict, ours: dict) -> tuple[list[str], list[str]]:
    """(the fields run_config.yaml determines that differ from this run's model config, notes). The MTP layer
    may differ: GLM5Bridge leaves it out by default, and a GLM-5 run here starts it from fresh weights."""
    theirs = saved["model_config"]
    differ = sorted(k for k in KNOWN_FIELDS if theirs.get(k) != ours.get(k) and k != "num_nextn_predict_layers")
    held, wanted = theirs.get("num_nextn_predict_layers", 0), ours.get("num_nextn_predict_layers", 0)
    notes = []
    if wanted > held:
        notes.append(f"the checkpoint has no MTP layer (run_config.yaml mtp_num_layers: {held or None}; GLM5Bridge "
                     "leaves it out by default): the MTP layer starts from fresh weights")
    elif held > wanted:
        notes.append("the checkpoint's MTP layer is not used (this run's model config has none)")
    return differ, notes


def fresh_prefixes(saved: dict, ours: dict) -> tuple[str, ...]:
    """The model keys a load leaves at this run's initialization (the MTP layer a Bridge checkpoint lacks)."""
    if is_bridge_state(saved) and ours.get("num_nextn_predict_layers", 0) > saved["model_config"].get(
            "num_nextn_predict_layers", 0):
        return ("mtp.",)
    return ()


# --- writing: what Bridge's loaders read, for one of our checkpoints (tools/export_bridge.py) ---------------
def _callable(target: str) -> dict:
    return {"_call_": False, "_target_": target}


def model_section(cfg: GLM5Config) -> dict:
    """run_config.yaml's `model` section for our model: what GLM5Bridge's provider would hold for the same HF
    config (tests/pretrain/checkpoint/test_bridge_interop.py checks it against a run_config.yaml Bridge wrote)."""
    hf = dataclasses.asdict(cfg)
    section = {"_target_": PROVIDER, **{bridge: hf[name] for name, bridge in SAME}, **FIXED, **WRITTEN_AS_GLM5BRIDGE,
               **PORTABLE}
    section.update(
        kv_channels=cfg.qk_rope_head_dim,
        moe_layer_freq=[0] * cfg.first_k_dense_replace + [1] * cfg.num_moe_layers,
        moe_shared_expert_intermediate_size=cfg.moe_intermediate_size * cfg.n_shared_experts,
        mtp_num_layers=cfg.num_nextn_predict_layers or None,
        activation_func=_callable("torch.nn.functional.silu"),
        params_dtype=_callable(f"torch.{cfg.torch_dtype}"),
        bf16=cfg.torch_dtype == "bfloat16",
        transformer_layer_spec=_callable(LAYER_SPEC),
    )
    if cfg.shares_top_k:
        raise BridgeFormatError("IndexShare (indexer_types with 'shared' layers) has no run_config.yaml "
                                "equivalent here yet")
    return dict(sorted(section.items()))


def run_config_for(cfg: GLM5Config, layout: dict) -> dict:
    """The run_config.yaml Bridge's loaders read: the `model` section (load_megatron_model, export_ckpt), the
    layout it was saved at and the `checkpoint` flags its training load reads (pretrained_checkpoint, load).
    save_optim/save_rng false: our optimizer and RNG state are not in Bridge's layout, and Bridge skips them."""
    model = model_section(cfg)
    model.update(tensor_model_parallel_size=layout.get("tp", 1), pipeline_model_parallel_size=layout.get("pp", 1))
    checkpoint = {"_target_": CHECKPOINT, "ckpt_format": "torch_dist", "fully_parallel_save": True,
                  "save_optim": False, "save_rng": False}
    return {"_target_": CONTAINER, "checkpoint": checkpoint, "model": dict(sorted(model.items()))}


def train_state_for(iteration: int, consumed_samples: int) -> dict:
    """train_state.pt's tensors (Bridge's TrainState.state_dict: names and dtypes)."""
    return {"step": torch.tensor(iteration, dtype=torch.int64),
            "consumed_train_samples": torch.tensor(consumed_samples, dtype=torch.int64),
            "skipped_train_samples": torch.tensor(0, dtype=torch.int64),
            "consumed_valid_samples": torch.tensor(0, dtype=torch.int64),
            "floating_point_operations_so_far": torch.tensor(0.0),
            "do_train": torch.tensor(False), "do_valid": torch.tensor(False), "do_test": torch.tensor(False)}
