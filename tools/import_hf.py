"""Import a Hugging Face GLM-5 model (BF16, FP32 or block-FP8) as one of our checkpoints.

    python tools/import_hf.py --hf HF_DIR --save CKPT [--bf16]
    torchrun --nproc_per_node 4 tools/import_hf.py --hf HF_DIR --save CKPT --expert-model-parallel-size 4

The result is an ordinary checkpoint of iteration 0 (pretrain/checkpoint/checkpointer.py's layout: dist_checkpointing
torch_dist + run_state.json) with model weights only, marked `"weights_only": true`: training starts
from it with `launch/pretrain.py --model-config HF_DIR/config.json --load CKPT` at any layout (our
checkpoints reshard). The layout flags only decide how the work and memory are split while importing:
each rank builds its part of the model (the same builder as training), fills every parameter shard it
holds from the HF tensors it needs (model/hf_mapping.py's inverse transforms; FP8 blocks dequantized
with their weight_scale_inv), and the ranks save collectively. Nothing appears at CKPT/iter_0000000
until the save is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# megatron-core announces at import that Apex/Transformer Engine are absent (expected on CPU).
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model import fp8_blocks, hf_mapping  # noqa: E402
from model.config import GLM5Config  # noqa: E402
from model.config_flash import is_flash  # noqa: E402
from pretrain.checkpoint.output_guard import check_output  # noqa: E402
from tools.lib import flash_hf  # noqa: E402

INDEX = "model.safetensors.index.json"


class HfImportError(RuntimeError):
    pass


class HfTensors:
    """The tensors of an HF model directory, read one at a time (safetensors memory-maps its files);
    FP8 weights come back dequantized to fp32."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self.dir = Path(directory)
        if (self.dir / INDEX).exists():
            self.weight_map = json.loads((self.dir / INDEX).read_text())["weight_map"]
        elif (self.dir / "model.safetensors").exists():
            with safe_open(str(self.dir / "model.safetensors"), "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"--hf {directory}: no {INDEX} or model.safetensors")
        for name in sorted(set(self.weight_map.values())):
            if not (self.dir / name).exists():
                raise FileNotFoundError(f"--hf {directory}: {name} is listed in {INDEX} but missing")
        config = json.loads((self.dir / "config.json").read_text())
        quant = config.get("quantization_config") or {}
        self.block = None
        if quant:
            block = quant.get("weight_block_size")
            if quant.get("quant_method") != "fp8" or not block or block[0] != block[1]:
                raise ValueError(f"--hf {directory}: quantization_config {quant} is not square-block FP8")
            self.block = int(block[0])
        self._open, self._safe_open = {}, safe_open

    def _file(self, name: str):
        fname = self.weight_map[name]
        if fname not in self._open:
            self._open[fname] = self._safe_open(str(self.dir / fname), "pt")
        return self._open[fname]

    def get(self, name: str) -> torch.Tensor:
        t = self._file(name).get_tensor(name)
        scale = hf_mapping.scale_name(name) if name.endswith("weight") else None
        if scale in self.weight_map:
            return fp8_blocks.dequantize(t, self._file(scale).get_tensor(scale), self.block)
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name}: dtype {t.dtype} without a weight_scale_inv")
        return t


def check_names(hf: HfTensors, convs) -> None:
    wanted = {n for c in convs for n in c.hf}
    present = {n for n in hf.weight_map if not n.endswith("weight_scale_inv")}
    missing, extra = sorted(wanted - present), sorted(present - wanted)
    if missing:
        raise HfImportError(f"--hf {hf.dir}: {len(missing)} tensors the config needs are missing "
                            f"(first: {missing[:3]}); note that transformers' save_pretrained drops the MTP layer")
    if extra:
        raise HfImportError(f"--hf {hf.dir}: {len(extra)} tensors have no megatron name (first: {extra[:3]})")


@torch.no_grad()
def fill_chunk(chunk, hf: HfTensors, convs_by_name: dict, dims: hf_mapping.Dims, metadata: dict) -> int:
    """Copy into every parameter (and the expert-bias buffers) of one model chunk the part this rank
    holds, using megatron's own sharding description: each ShardedTensor names its global key,
    offset and shape, and its data is a view of the parameter. Returns the number of shards filled."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    # Poison every weight first: one the sharding description missed would otherwise keep its
    # random initialization silently.
    weights = {k: v for k, v in chunk.state_dict(keep_vars=True).items()
               if torch.is_tensor(v) and v.is_floating_point()}
    for v in weights.values():
        v.data.fill_(float("nan"))
    sharded = chunk.sharded_state_dict(metadata=metadata)
    apply_factories(sharded)  # a GLU fc1 becomes its gate and up halves (views of the parameter)
    cached_name, cached = None, None
    filled = 0
    for sh in nested_values(sharded):
        if not isinstance(sh, ShardedTensor):
            continue  # _extra_state objects
        if sh.flattened_range is not None:
            raise HfImportError(f"{sh.key}: flattened model shards are not supported")
        n = sh.prepend_axis_num
        expert = sh.global_offset[0] if hf_mapping.is_stacked_experts(sh.key) else None
        name = hf_mapping.logical_name(sh.key, expert)
        if name not in convs_by_name:
            raise HfImportError(f"megatron tensor {name} has no HF mapping (model/hf_mapping.py)")
        if name != cached_name:
            c = convs_by_name[name]
            cached_name, cached = name, c.transform.to_megatron([hf.get(x) for x in c.hf], dims)
        region = cached
        for dim, (start, size) in enumerate(zip(sh.global_offset[n:], sh.local_shape)):
            region = region.narrow(dim, start, size)
        if tuple(region.shape) != tuple(sh.data.shape):
            raise HfImportError(f"{name}: HF gives {tuple(cached.shape)}, the model's shard is "
                            f"{tuple(sh.data.shape)} at {sh.global_offset}")
        sh.data.copy_(region)
        filled += 1
    unfilled = [k for k, v in weights.items() if torch.isnan(v).any()]
    if unfilled:
        raise HfImportError(f"{len(unfilled)} model tensors were not filled from HF (first: {unfilled[:3]})")
    return filled


def _init(args, cfg: GLM5Config):
    from parallel import runtime as rt
    from parallel.dims import ParallelDims

    world = rt.world_size_from_env()
    dims = ParallelDims(world_size=world, tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                        ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size,
                        sequence_parallel=args.tensor_model_parallel_size > 1,
                        layers_per_virtual_stage=args.num_layers_per_virtual_pipeline_stage)
    dims.validate(cfg, seq_length=dims.tp, micro_batch_size=1, global_batch_size=dims.dp)
    runtime = rt.init_distributed()
    rt.init_model_parallel(dims, cfg.num_hidden_layers, seed=0)
    return runtime, dims


def import_hf(args) -> Path:
    from model.builder import build_model
    from model.mcore_config import ModelOptions, to_transformer_config
    from pretrain.checkpoint import checkpointer as ck
    from pretrain.checkpoint.run_state import Progress, layout_of

    check_output("--save", args.save, {"--hf": args.hf})  # never the input, nor a checkpoint, whatever --force says
    hf_config = json.loads((Path(args.hf) / "config.json").read_text())
    save = Path(args.save)
    if save.exists() and any(save.iterdir()) and not args.force:
        raise FileExistsError(f"--save {save} exists and is not empty; pass --force to replace it")
    if is_flash(hf_config):  # GLM-5.3-Flash: its own path (tools/lib/flash_hf.py)
        cfg, chunks, runtime, dims, note = flash_hf.import_flash(args, hf_config)
        if note:
            print(f"import_hf: note: {note}", file=sys.stderr)
    else:
        cfg = GLM5Config.from_hf_dict(hf_config)
        hf = HfTensors(args.hf)
        convs = hf_mapping.conversions(cfg)
        check_names(hf, convs)
        runtime, dims = _init(args, cfg)
        options = ModelOptions(params_dtype=torch.bfloat16 if args.bf16 else torch.float32, bf16=args.bf16)
        tconfig = to_transformer_config(cfg, options, dims)
        chunks = build_model(cfg, tconfig, use_te=False)
        by_name = {c.megatron: c for c in convs}
        tdims = hf_mapping.Dims.of(cfg, padded_vocab_size=tconfig.padded_vocab_size)
        for chunk in chunks:
            fill_chunk(chunk, hf, by_name, tdims, ck.SHARDING_METADATA)

    if runtime.rank == 0 and save.exists():
        shutil.rmtree(save)  # --force
    dist.barrier()
    parts = ck.CheckpointParts(model=chunks, progress=Progress())  # weights only: no engine, scheduler, data
    run_info = dict(model_config=cfg.to_hf_dict(), layout=layout_of(dims), weights_only=True,
                    distributed_optimizer=False, source={"hf": str(Path(args.hf).resolve())})
    return ck.save(str(save), parts, run_info, runtime.device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--save", required=True, help="checkpoint root to create")
    p.add_argument("--bf16", action="store_true", help="store bf16 weights (default fp32, as training keeps them)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --save (never one holding a checkpoint, nor the --hf input)")
    g = p.add_argument_group("layout while importing (the checkpoint loads at any layout)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from parallel import runtime as rt

    try:
        final = import_hf(args)
    except (HfImportError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"import_hf: error: {e}", file=sys.stderr)
        return 2
    finally:
        rt.shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"checkpoint": str(final), "iteration": 0, "weights_only": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
