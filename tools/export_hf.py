"""Export one of our checkpoints as a Hugging Face GLM-5 model directory (GlmMoeDsaForCausalLM).

    python tools/export_hf.py --load CKPT [--iteration N] --output DIR [--dtype bf16|fp32|fp8]
        [--max-shard-size 5GB] [--tokenizer TOKENIZER_DIR] [--verify] [--force]

Streaming: one process, no process group, no model. The tensor list and every shard's contents are
planned from the checkpoint's metadata; then each HF tensor is read from the dist checkpoint on its
own (one logical tensor, or one expert of a stacked expert tensor), transformed (model/hf_mapping.py),
cast or FP8-quantized (model/fp8_blocks.py) and appended to its safetensors file, whose header was
written first. Peak memory is about twice the largest stored tensor chunk over the interpreter's
baseline, whatever the shard size or the model size (docs/EXPORT.md has the measurements).

The directory appears complete or not at all: everything is written into DIR.partial-<pid> and renamed
to DIR at the end (after --verify passes). See docs/EXPORT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# megatron-core announces at import that Apex/Transformer Engine are absent (expected on CPU).
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

import torch  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata  # noqa: E402
from torch.distributed.checkpoint.planner import LoadPlan  # noqa: E402
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model import fp8_blocks, hf_mapping, key_layout  # noqa: E402
from model.config import GLM5Config  # noqa: E402
from model.config_flash import is_flash  # noqa: E402
from parallel.compat.torch_checkpoint import CheckpointDataRefused, read_checkpoints_as_data, refusal_in  # noqa: E402
from pretrain.checkpoint.integrity import advice, damage  # noqa: E402
from pretrain.checkpoint.checkpointer import CheckpointError, iter_dir, read_run_state  # noqa: E402
from tools.lib import flash_hf  # noqa: E402
from tools.lib.hf_verify import VerificationError, verify_export  # noqa: E402
from pretrain.checkpoint.output_guard import check_output, replace_output  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}  # fp8: unquantized ones in bf16
SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3"}
TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|vocab\..*|merges\.txt|added_tokens\.json"
                             r"|.*\.tiktoken|.*\.model|chat_template.*|generation_config\.json)$")
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [fp8_blocks.BLOCK, fp8_blocks.BLOCK]}


# --- reading our checkpoint, one tensor at a time --------------------------------------------------
class CheckpointTensors:
    """Reads single tensors, or one expert of a stacked expert tensor, from a dist_checkpointing
    (torch_dist) directory with torch.distributed.checkpoint's own reader: no process group, and only
    the stored chunks that overlap the request are read."""

    def __init__(self, directory: Path):
        read_checkpoints_as_data()  # the metadata is unpickled: data only (parallel/compat/torch_checkpoint.py)
        self.reader = FileSystemReader(str(directory))
        self.metadata = self.reader.read_metadata()  # read once (it indexes every chunk)
        self.reader.set_up_storage_reader(self.metadata, True)
        # a checkpoint in GPTModel's key layout (this project before HybridModel): read through the key map
        self.gpt_layout = key_layout.layout_of(self.model_keys()) == key_layout.GPT

    def stored(self, logical: str) -> tuple[str, int | None]:
        key, expert = hf_mapping.storage_key(logical)
        return (key_layout.to_gpt(key) if self.gpt_layout else key), expert

    def model_keys(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items()
                if isinstance(v, TensorStorageMetadata) and not k.startswith("optimizer.")]

    def _meta(self, key: str) -> TensorStorageMetadata:
        return self.metadata.state_dict_metadata[key]

    def shape(self, logical: str) -> tuple[int, ...]:
        key, expert = self.stored(logical)
        size = tuple(self._meta(key).size)
        return size[1:] if expert is not None else size

    def dtype(self, logical: str) -> torch.dtype:
        return self._meta(self.stored(logical)[0]).properties.dtype

    def read(self, logical: str) -> torch.Tensor:
        key, expert = self.stored(logical)
        md = self._meta(key)
        full = tuple(md.size)
        offsets = (expert, *[0] * (len(full) - 1)) if expert is not None else (0,) * len(full)
        sizes = (1, *full[1:]) if expert is not None else full
        out = torch.empty(sizes, dtype=md.properties.dtype)
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, md, [chunk])
        covered = sum(int(torch.Size(i.lengths).numel()) for i in items)
        if covered != out.numel():
            raise CheckpointError(f"{key}: the checkpoint's chunks do not cover {logical} (incomplete checkpoint)")
        self.reader.read_data(LoadPlan(items), _Into(out)).wait()
        return out[0] if expert is not None else out


class _Into:
    """The two planner calls FileSystemReader.read_data makes: where each read chunk goes."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def resolve_tensor(self, item):
        t = self.out
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            t = t.narrow(dim, start, length)
        return t

    def commit_tensor(self, item, tensor):
        pass


# --- the plan: which HF tensor comes from where, in which file -------------------------------------
@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: int          # index into the conversions list
    part: int            # which of the transform's outputs
    scale_of: str | None = None  # for an FP8 weight_scale_inv: the weight it scales

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass
class Shard:
    tensors: list[OutTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_tensors(convs, ckpt: CheckpointTensors, dims: hf_mapping.Dims, dtype: str) -> list[OutTensor]:
    out = []
    for i, c in enumerate(convs):
        for part, (name, shape) in enumerate(zip(c.hf, c.transform.hf_shapes(ckpt.shape(c.megatron), dims))):
            if hf_mapping.keeps_fp32(name):
                out.append(OutTensor(name, shape, torch.float32, i, part))
            elif dtype == "fp8" and hf_mapping.fp8_quantized(name, len(shape)):
                out.append(OutTensor(name, shape, torch.float8_e4m3fn, i, part))
                out.append(OutTensor(hf_mapping.scale_name(name), fp8_blocks.scale_shape(shape), torch.float32,
                                     i, part, scale_of=name))
            else:
                out.append(OutTensor(name, shape, DTYPES[dtype], i, part))
    return out


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[Shard]:
    """Greedy in model order, as transformers' save_pretrained does; a tensor larger than the limit
    gets a shard of its own. An FP8 weight and its scale stay in the same file."""
    shards, current, size = [], Shard(), 0
    for t in tensors:
        if current.tensors and t.scale_of is None and size + t.nbytes > max_bytes:
            shards.append(current)
            current, size = Shard(), 0
        current.tensors.append(t)
        size += t.nbytes
    if current.tensors:
        shards.append(current)
    return shards


def check_complete(convs, ckpt: CheckpointTensors, directory: Path) -> None:
    """Every tensor the model needs is in the checkpoint, and nothing in it lacks an HF name."""
    stored = set(ckpt.model_keys())
    needed = {ckpt.stored(c.megatron)[0] for c in convs}
    missing, extra = sorted(needed - stored), sorted(stored - needed)
    if missing:
        raise CheckpointError(f"{directory}: incomplete checkpoint, {len(missing)} model tensors missing "
                              f"(first: {missing[:3]})")
    if extra:
        raise CheckpointError(f"{directory}: {len(extra)} tensors have no HF mapping (first: {extra[:3]}); "
                              "model/hf_mapping.py does not know this model")


# --- writing ---------------------------------------------------------------------------------------
def _header(shard: Shard) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in shard.tensors:
        header[t.name] = {"dtype": SAFETENSORS_DTYPE[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: Path, shard: Shard, produce) -> None:
    """A safetensors file written header first, then each tensor as it is produced."""
    with open(path, "wb") as f:
        f.write(_header(shard))
        for t in shard.tensors:
            data = produce(t)
            if tuple(data.shape) != t.shape or data.dtype != t.dtype:
                raise AssertionError(f"{t.name}: produced {tuple(data.shape)} {data.dtype}, "
                                     f"planned {t.shape} {t.dtype}")
            f.write(data.contiguous().reshape(-1).view(torch.uint8).numpy())  # no extra copy


class Producer:
    """Turns planned tensors into data, reading each checkpoint tensor once per shard that needs it."""

    def __init__(self, convs, ckpt: CheckpointTensors, dims: hf_mapping.Dims):
        self.convs, self.ckpt, self.dims = convs, ckpt, dims
        self._cached: tuple[int, list[torch.Tensor]] | None = None  # the last source's HF tensors
        self._scales: dict[str, torch.Tensor] = {}

    def _hf(self, source: int) -> list[torch.Tensor]:
        if self._cached is None or self._cached[0] != source:
            c = self.convs[source]
            self._cached = (source, c.transform.to_hf(self.ckpt.read(c.megatron), self.dims))
        return self._cached[1]

    def __call__(self, t: OutTensor) -> torch.Tensor:
        if t.scale_of is not None:
            return self._scales.pop(t.scale_of)
        value = self._hf(t.source)[t.part]
        if t.dtype == torch.float8_e4m3fn:
            q, self._scales[t.name] = fp8_blocks.quantize(value)
            return q
        return value.to(t.dtype)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text.upper().replace("IB", "I"))
    if not m:
        raise argparse.ArgumentTypeError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 20MiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2) or "_"))


def hf_config(cfg: GLM5Config, dtype: str) -> dict:
    d = cfg.replace(torch_dtype="float32" if dtype == "fp32" else "bfloat16").to_hf_dict()
    if dtype == "fp8":
        d["quantization_config"] = dict(FP8_CONFIG)
    return d


def tokenizer_files(src: str) -> list[Path]:
    d = Path(src)
    files = [p for p in sorted(d.iterdir()) if p.is_file() and TOKENIZER_FILES.match(p.name)] if d.is_dir() else []
    if not files:
        raise FileNotFoundError(f"--tokenizer {src}: no tokenizer files there "
                                "(tokenizer.json, tokenizer_config.json, ...)")
    return files


def export(load: str, output: str, *, iteration: int | None = None, dtype: str = "bf16",
           max_shard_size: int = 5 * 10**9, tokenizer: str | None = None, verify: bool = False,
           force: bool = False, progress: bool = True) -> dict:
    """Export and return a summary; raises CheckpointError/FileExistsError/ValueError on bad input."""
    iteration, state = read_run_state(load, iteration)
    directory = iter_dir(load, iteration)
    try:
        found = damage(directory)
    except CheckpointDataRefused as e:
        raise CheckpointError(f"--load {load}: iteration {iteration}: {e}") from None
    if found:
        raise CheckpointError(f"--load {load}: iteration {iteration} is damaged: {found}; "
                              f"{advice(load, iteration).replace('--ckpt-step', '--iteration')}")
    out = Path(output)
    check_output("--output", out, {"--load": load, "--tokenizer": tokenizer})  # whatever --force says
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"--output {out} exists and is not empty; pass --force to replace it")
    tok_files = tokenizer_files(tokenizer) if tokenizer else []
    if is_flash(state["model_config"]):  # GLM-5.3-Flash: its own path (tools/lib/flash_hf.py)
        summary = flash_hf.export_flash(load, output, iteration, dtype, verify, tok_files)
        print(f"export_hf: note: {summary['note']}", file=sys.stderr)
        return summary
    cfg = GLM5Config.from_hf_dict(state["model_config"])
    ckpt = CheckpointTensors(directory)
    convs = hf_mapping.conversions(cfg, state.get("format_version"))  # an older checkpoint's layout too
    check_complete(convs, ckpt, directory)
    dims = hf_mapping.Dims.of(cfg, padded_vocab_size=ckpt.shape(hf_mapping.EMBEDDING[0])[0])
    shards = plan_shards(plan_tensors(convs, ckpt, dims, dtype), max_shard_size)

    start = time.perf_counter()
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    try:
        partial.mkdir(parents=True)
        produce = Producer(convs, ckpt, dims)
        weight_map = {}
        total = sum(s.nbytes for s in shards)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"export {out.name}", disable=not progress) as bar:
            for n, shard in enumerate(shards, 1):
                name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                write_shard(partial / name, shard, produce)
                weight_map.update({t.name: name for t in shard.tensors})
                bar.update(shard.nbytes)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (partial / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2, sort_keys=True) + "\n")
        for f in tok_files:
            shutil.copy2(f, partial / f.name)
        summary = {"output": str(out), "iteration": iteration, "dtype": dtype, "shards": len(shards),
                   "total_bytes": total, "tensors": len(weight_map), "tokenizer_files": [f.name for f in tok_files],
                   "export_seconds": round(time.perf_counter() - start, 2)}
        if verify:
            try:
                summary["verify"] = verify_export(load, iteration, str(partial), dtype)
            except BaseException as e:  # torch's CheckpointException is a BaseException
                if (refused := refusal_in(e)) is None:
                    raise
                raise CheckpointError(f"--load {load}: iteration {iteration}: {refused}") from None
        replace_output("--output", partial, out, {"--load": load, "--tokenizer": tokenizer})
        return summary
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint root (the --save of training)")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    p.add_argument("--output", required=True, help="the HF model directory to create")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp8"], default="bf16",
                   help="fp8: float8_e4m3fn weights with 128x128-block weight_scale_inv, as GLM-5-FP8")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB", help="per safetensors file")
    p.add_argument("--tokenizer", default=None, help="an HF tokenizer directory to copy into the output")
    p.add_argument("--verify", action="store_true",
                   help="compare logits of our model and the export loaded by transformers (CPU, small models)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output (never one holding a checkpoint, nor --load or --tokenizer)")
    args = p.parse_args(argv)
    try:
        summary = export(args.load, args.output, iteration=args.iteration, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, tokenizer=args.tokenizer, verify=args.verify,
                         force=args.force)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"export_hf: verification FAILED, nothing written to {args.output}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
