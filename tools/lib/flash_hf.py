"""GLM-5.3-Flash (`glm5_next`) checkpoints to and from Hugging Face: what tools/import_hf.py and
tools/export_hf.py do when the config is GLM-5.3-Flash's.

Import reads the text weights of a `Glm5NextForConditionalGeneration` directory (`model.language_model.*` and
`lm_head.weight`; the vision tower `model.visual.*` is not trained here and is left out, said so in the
summary), builds our HybridModel in one process (model/specs_flash.py), fills it by
model/flash_hf_mapping.py's `hybrid_from_hf` and saves an ordinary weights-only checkpoint of iteration 0.
Export builds the same model, loads the checkpoint, maps it back (`hybrid_to_hf`) and writes a directory that
`Glm5NextForConditionalGeneration.from_pretrained` loads: the text weights and a `glm5_next` config.json. It
holds no vision tower: transformers initialises one at random when it loads the directory (its load report
names only `model.visual.*` as missing), and the summary says so. `--verify` loads the export in transformers
and compares its text logits with our model's.

One process, the whole model in memory, TP = PP = EP = 1 (layout flags other than 1 are refused by name): what
GLM-5.3-Flash's tiny and mid-sized configs need; the streaming, sharded paths of the GLM-5 tools are not
wired for it yet.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

TEXT_PREFIX, VISION_PREFIX, HEAD = "model.language_model.", "model.visual.", "lm_head.weight"
VISION_NOTE = ("the vision tower (model.visual.*) is not trained here: the export holds the text model only, and "
               "transformers initialises a vision tower at random when it loads it")


def _one_process(cfg, flag_values: dict):
    for flag, value in flag_values.items():
        if value not in (None, 1):
            raise ValueError(f"{flag} {value}: GLM-5.3-Flash imports and exports in one process (1) so far")
    from parallel import runtime as rt
    from parallel.dims import ParallelDims

    runtime = rt.init_distributed()
    rt.init_model_parallel(ParallelDims(world_size=1), cfg.num_hidden_layers, seed=0)
    return runtime


def _build(cfg, dtype: torch.dtype, device):
    from model.mcore_config import ModelOptions
    from model.mcore_config_flash import to_flash_transformer_config
    from model.builder_flash import build_flash_model

    tconfig = to_flash_transformer_config(cfg, ModelOptions(params_dtype=dtype, bf16=dtype == torch.bfloat16))
    return build_flash_model(cfg, tconfig).to(device)


def read_text_tensors(hf_dir: str) -> tuple[dict, list[str]]:
    """The text model's tensors (Glm5NextTextModel's names, and lm_head.weight) and the names left out."""
    from safetensors import safe_open

    d = Path(hf_dir)
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    text, skipped = {}, []
    for name in files:
        if not (d / name).exists():
            raise FileNotFoundError(f"--hf {hf_dir}: {name} is missing")
        with safe_open(str(d / name), "pt") as f:
            for k in f.keys():
                if k.startswith(TEXT_PREFIX):
                    text[k[len(TEXT_PREFIX):]] = f.get_tensor(k)
                elif k == HEAD:
                    text[k] = f.get_tensor(k)
                else:
                    skipped.append(k)
    unknown = [k for k in skipped if not k.startswith(VISION_PREFIX)]
    if unknown:
        raise ValueError(f"--hf {hf_dir}: {len(unknown)} tensors are neither text nor vision (first: {unknown[:3]})")
    from model.flash_hf_mapping import text_from_files

    return text_from_files(text), skipped


@torch.no_grad()
def import_flash(args, hf_config: dict):
    """(config, model chunks with the --hf text weights, runtime, layout, note) for tools/import_hf.py to save."""
    from model.config_flash import GLM5FlashConfig
    from model.flash_hf_mapping import hybrid_from_hf
    from parallel.dims import ParallelDims

    cfg = GLM5FlashConfig.from_hf_dict(hf_config)
    text, skipped = read_text_tensors(args.hf)
    runtime = _one_process(cfg, {"--tensor-model-parallel-size": args.tensor_model_parallel_size,
                                 "--pipeline-model-parallel-size": args.pipeline_model_parallel_size,
                                 "--expert-model-parallel-size": args.expert_model_parallel_size})
    model = _build(cfg, torch.bfloat16 if args.bf16 else torch.float32, runtime.device)
    ours = hybrid_from_hf(text, cfg, model.embedding.word_embeddings.weight.shape[0])
    unused = sorted(set(text) - {k for k in text if k == HEAD or k.split(".")[0] in ("embed_tokens", "norm", "layers")})
    if unused:
        raise ValueError(f"--hf {args.hf}: text tensors with no place in the model: {unused[:3]}")
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not k.endswith(("_extra_state", "local_tokens_per_expert"))]
    if missing or unexpected:
        raise ValueError(f"--hf {args.hf}: model tensors not filled {missing[:3]}, unexpected {unexpected[:3]}")
    # the config carries the source's vision_config (not its weights): the export describes the same model
    return cfg, [model], runtime, ParallelDims(world_size=1), VISION_NOTE if skipped else None


def load_our_model(load: str, iteration: int | None):
    """Our Flash model (fp32, one process) with the checkpoint's weights, and its config."""
    from model.config_flash import GLM5FlashConfig
    from pretrain.checkpoint import extra_state
    from pretrain.checkpoint.checkpointer import SHARDING_METADATA
    from pretrain.checkpoint.run_state import iter_dir, read_run_state

    iteration, state = read_run_state(load, iteration)
    cfg = GLM5FlashConfig.from_hf_dict(state["model_config"])
    runtime = _one_process(cfg, {})
    model = _build(cfg, torch.float32, runtime.device)
    loaded = extra_state.load({"model": model.sharded_state_dict(metadata=SHARDING_METADATA)},
                              iter_dir(load, iteration))
    model.load_state_dict(loaded["model"])
    return model.eval(), cfg, iteration


def hf_logits(hf_dir: str, tokens: torch.Tensor):
    from transformers import Glm5NextForConditionalGeneration

    model, info = Glm5NextForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                                   output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not k.startswith(VISION_PREFIX)]
    if missing or info["unexpected_keys"]:
        raise RuntimeError(f"transformers' load of {hf_dir}: missing {missing[:3]}, unexpected "
                           f"{sorted(info['unexpected_keys'])[:3]}")
    with torch.no_grad():
        return model.eval()(input_ids=tokens).logits.float()


@torch.no_grad()
def export_flash(load: str, output: str, iteration: int | None, dtype: str, verify: bool,
                 tokenizer_files: list[Path] = ()) -> dict:
    """tools/export_hf.py's export for a GLM-5.3-Flash checkpoint (which has checked --output already)."""
    from safetensors.torch import save_file

    from model.flash_hf_mapping import hybrid_to_hf, text_to_files

    if dtype == "fp8":
        raise ValueError("--dtype fp8: GLM-5.3-Flash exports bf16 or fp32 so far")
    out = Path(output)
    model, cfg, iteration = load_our_model(load, iteration)
    store = torch.float32 if dtype == "fp32" else torch.bfloat16
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(("_extra_state", "local_tokens_per_expert"))}
    files = text_to_files(hybrid_to_hf(state, cfg))
    hf = {(k if k == HEAD else TEXT_PREFIX + k): v.to(store).contiguous() for k, v in files.items()}
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    try:
        partial.mkdir(parents=True)
        save_file(hf, str(partial / "model.safetensors"), metadata={"format": "pt"})
        config = cfg.replace(torch_dtype="float32" if dtype == "fp32" else "bfloat16").to_hf_dict()
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in tokenizer_files:
            shutil.copy2(f, partial / f.name)
        summary = {"output": str(out), "iteration": iteration, "dtype": dtype, "tensors": len(hf),
                   "tokenizer_files": [f.name for f in tokenizer_files], "note": VISION_NOTE}
        if verify:
            summary["verify"] = verify_flash(model, cfg, str(partial), store)
        from pretrain.checkpoint.output_guard import replace_output

        replace_output("--output", partial, out, {"--load": load})
        return summary
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def verify_flash(model, cfg, hf_dir: str, store: torch.dtype, num_tokens: int = 40, tolerance: float = 1e-4) -> dict:
    """Our logits (weights rounded as the export stores them) against transformers' on the export."""
    from tools.lib.hf_verify import VerificationError

    if store != torch.float32:
        for p in model.state_dict().values():
            if torch.is_tensor(p) and p.is_floating_point():
                p.copy_(p.to(store).to(p.dtype))
    tokens = torch.randint(1, cfg.vocab_size, (1, num_tokens), generator=torch.Generator().manual_seed(0))
    device = model.output_layer.weight.device
    ours = model(input_ids=tokens.to(device), position_ids=torch.arange(num_tokens, device=device)[None],
                 attention_mask=None)[..., : cfg.vocab_size].float().cpu()
    theirs = hf_logits(hf_dir, tokens)
    diff = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    if not diff <= tolerance * max(scale, 1.0):
        raise VerificationError(f"logits differ from transformers' Glm5NextForConditionalGeneration by {diff:.3g} "
                                f"(scale {scale:.3g}, tolerance {tolerance})")
    return {"tokens": num_tokens, "max_abs_diff": diff, "logit_scale": scale, "tolerance": tolerance}
