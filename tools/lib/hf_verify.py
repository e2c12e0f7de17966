"""Check an HF export against the checkpoint it came from: same tokens, same logits (the check behind
`tools/export_hf.py --verify` and `tools/verify_hf.py`; docs/EXPORT.md, "Verification").

Our model is built in this process on the runtime's device (CUDA on a GPU host; TP=1, fp32, megatron-core's
local modules) and loaded from the checkpoint with dist_checkpointing; the export is loaded by transformers
(`AutoModelForCausalLM`, fp32) and must have no missing keys. Both run the same random tokens -- more than
index_topk of them, so the DSA top-k selection really drops keys -- and the main logits must agree within
the tolerance (HF does not run the MTP layer).

A bf16 or fp8 export holds rounded weights. Our model is then given the same rounding, applied where
the export applies it: each weight goes megatron -> HF (model/hf_mapping.py), is rounded there (cast,
or FP8 block quantize-dequantize), and comes back by the inverse map. The comparison stays exact
(1e-4 in fp32) and still catches any mapping error, because the HF side reads the files. An FP8
export is dequantized into a temporary fp32 copy for transformers (its FP8 loader needs accelerate,
and a GPU to run without dequantizing).

It lives in pretrain/ rather than beside model/hf_mapping.py because it reads our checkpoints
(pretrain/checkpoint/checkpointer.py), and model/ imports nothing from pretrain/.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from model import fp8_blocks, hf_mapping


class VerificationError(RuntimeError):
    pass


def _state_dict_name(logical: str) -> str:
    """Logical megatron name -> the single-process (SequentialMLP) module's state_dict name."""
    key, expert = hf_mapping.storage_key(logical)
    if expert is None:
        return key
    return key.replace(".mlp.experts.experts.", f".mlp.experts.local_experts.{expert}.")


def _round_like_export(hf_name: str, t: torch.Tensor, dtype: str) -> torch.Tensor:
    if dtype == "fp32" or hf_mapping.keeps_fp32(hf_name):
        return t
    if dtype == "fp8" and hf_mapping.fp8_quantized(hf_name, t.dim()):
        return fp8_blocks.dequantize(*fp8_blocks.quantize(t), dtype=t.dtype)
    return t.to(torch.bfloat16).to(t.dtype)


@torch.no_grad()
def round_model_like_export(chunk, cfg, dtype: str) -> None:
    state = chunk.state_dict(keep_vars=True)
    dims = hf_mapping.Dims.of(cfg, padded_vocab_size=chunk.embedding.word_embeddings.weight.shape[0])
    for c in hf_mapping.conversions(cfg):
        target = state[_state_dict_name(c.megatron)]
        hf = [_round_like_export(n, t, dtype) for n, t in zip(c.hf, c.transform.to_hf(target.detach().clone(), dims))]
        target.copy_(c.transform.to_megatron(hf, dims))


def _init_single_process(cfg, seed: int = 1234) -> torch.device:
    from parallel import runtime as rt
    from parallel.dims import ParallelDims

    runtime = rt.init_distributed()
    rt.init_model_parallel(ParallelDims(world_size=1), cfg.num_hidden_layers, seed)
    return runtime.device


def build_our_model(load: str, iteration: int | None):
    """Our model (TP=1, fp32, on the runtime's device) with the checkpoint's weights, and its config."""
    from model.builder import build_model
    from model.config import GLM5Config
    from model.mcore_config import ModelOptions, to_transformer_config
    from pretrain.checkpoint import extra_state
    from pretrain.checkpoint.upgrade import stored_key_layout, upgrade_request
    from pretrain.checkpoint.checkpointer import SHARDING_METADATA
    from pretrain.checkpoint.run_state import iter_dir, read_run_state

    iteration, state = read_run_state(load, iteration)
    cfg = GLM5Config.from_hf_dict(state["model_config"])
    device = _init_single_process(cfg)
    (chunk,) = build_model(cfg, to_transformer_config(cfg, ModelOptions()), use_te=False)
    chunk.to(device)
    # DSA's dense reference path (megatron-core's torch functions), which takes its top-k with torch.topk
    # over the full score rows as transformers does: a random tiny model's indexer scores tie at exactly
    # 0 (ReLU), and the blockwise path breaks ties towards the lower key position, picking other (equally
    # scored) keys. What this checks is the weight map; the blockwise path equals the dense one up to
    # ties (tests/model/dsa/test_dsa_blockwise.py).
    for m in chunk.modules():
        if hasattr(m, "dsa_path"):
            m.dsa_path = "dense"
    # A TE run's checkpoint has extra-state objects this local model does not ask for (ignored); an
    # older format's tensors are converted as they load, a GPTModel-layout checkpoint's keys renamed.
    request = {"model": chunk.sharded_state_dict(metadata=SHARDING_METADATA)}
    directory = iter_dir(load, iteration)
    upgrade_request(request, state.get("format_version"), hf_mapping.Dims.of(cfg, padded_vocab_size=0),
                    stored_layout=stored_key_layout(directory))
    loaded = extra_state.load(request, directory)
    chunk.load_state_dict(loaded["model"])
    return chunk.eval(), cfg


def _dequantized_copy(src: Path, dst: Path) -> None:
    """An fp32 copy of an FP8 export (weights dequantized, scales and quantization_config dropped)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for name in sorted(set(index["weight_map"].values())):
        tensors = {}
        with safe_open(str(src / name), "pt") as f:
            keys = set(f.keys())
            for k in keys:
                if k.endswith("weight_scale_inv"):
                    continue
                t = f.get_tensor(k)
                scale = hf_mapping.scale_name(k) if k.endswith("weight") else None
                tensors[k] = (fp8_blocks.dequantize(t, f.get_tensor(scale)) if scale in keys else t.float())
        save_file(tensors, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config))


def load_hf(hf_dir: str):
    from transformers import AutoModelForCausalLM

    config = json.loads((Path(hf_dir) / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        path = hf_dir
        if "quantization_config" in config:
            _dequantized_copy(Path(hf_dir), Path(tmp))
            path = tmp
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its load report lists the MTP layer: judged in verify_export
        try:
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
        finally:
            transformers.logging.set_verbosity(verbosity)
    return model.eval(), info


def main_logits(chunk, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s, padded vocab] logits of the main head, on the CPU. With an MTP layer megatron's HybridModel needs
    labels and returns losses; the logits are the output layer's last call (after the MTP heads'),
    cloned because the cross entropy then works on them in place."""
    calls = []
    device = chunk.output_layer.weight.device  # the runtime's: CUDA on a GPU host
    tokens = tokens.to(device)
    hook = chunk.output_layer.register_forward_hook(lambda mod, args, out: calls.append(out[0].clone()))
    try:
        positions = torch.arange(tokens.shape[1], device=device)[None].expand_as(tokens)
        chunk(input_ids=tokens, position_ids=positions, attention_mask=None, labels=tokens)
    finally:
        hook.remove()
    return calls[-1].transpose(0, 1).float().cpu()  # [s, b, V] -> [b, s, V], beside HF's (CPU) logits


@torch.no_grad()
def verify_export(load: str, iteration: int | None, hf_dir: str, dtype: str, num_tokens: int = 48,
                  tolerance: float = 1e-4, seed: int = 0) -> dict:
    ours, cfg = build_our_model(load, iteration)
    tokens = torch.randint(0, cfg.vocab_size, (1, num_tokens), generator=torch.Generator().manual_seed(seed))
    result = {"tokens": num_tokens, "index_topk": cfg.index_topk, "dtype": dtype, "tolerance": tolerance}
    if dtype != "fp32":
        unrounded = main_logits(ours, tokens)[..., : cfg.vocab_size]
        round_model_like_export(ours, cfg, dtype)
    hf, info = load_hf(hf_dir)
    if type(hf).__name__ != "GlmMoeDsaForCausalLM":
        raise VerificationError(f"transformers loaded {type(hf).__name__}, not GlmMoeDsaForCausalLM")
    if info["missing_keys"]:
        raise VerificationError(f"transformers reports missing keys: {sorted(info['missing_keys'])[:5]}")
    mtp = tuple(f"model.layers.{cfg.num_hidden_layers + i}." for i in range(cfg.num_nextn_predict_layers))
    unused = sorted(k for k in info["unexpected_keys"] if not (mtp and k.startswith(mtp)))
    if unused:  # the MTP layer is expected: transformers does not build it
        raise VerificationError(f"transformers did not use {len(unused)} weight(s): {unused[:5]}")
    ours_logits = main_logits(ours, tokens)[..., : cfg.vocab_size]
    hf_logits = hf(input_ids=tokens).logits.float()
    diff = (ours_logits - hf_logits).abs().max().item()
    result["max_abs_logit_diff"] = diff
    if dtype != "fp32":  # for information: what the rounding itself changes
        result["rounding_max_abs_logit_change"] = (unrounded - hf_logits).abs().max().item()
    if not diff <= tolerance:
        raise VerificationError(f"max |logit difference| {diff:.3e} > {tolerance:g} over {num_tokens} tokens")
    return result
