"""Write one of our checkpoints in Megatron-Bridge 0.6.2's layout, for Bridge's public loaders
(`AutoBridge.export_ckpt`, `load_megatron_model`) and its `checkpoint.pretrained_checkpoint`.

    python tools/export_bridge.py --load CKPT [--iteration N] --save BRIDGE_DIR [--force]

BRIDGE_DIR/iter_N/ gets the checkpoint's tensor files as they are (hard links where the filesystem allows,
else copies) and its `.metadata` with every key in megatron-core GPTModel's layout, which GLM5Bridge reads
(ours are HybridModel's: model/key_layout.py; a key names its bytes only in `.metadata`). Beside them, Bridge's
run_config.yaml (its `model` section as GLM5Bridge builds it for the same HF config:
pretrain/checkpoint/bridge_format.py) and train_state.pt; BRIDGE_DIR/latest_checkpointed_iteration.txt and
latest_train_state.pt point at it. Our optimizer tensors travel in the same files; Bridge's model loaders
do not ask for them. BRIDGE_DIR appears complete or not at all (written as BRIDGE_DIR.partial-<pid>).
See docs/INTEROP.md.
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
import yaml  # noqa: E402

from model import key_layout  # noqa: E402
from model.config import GLM5Config  # noqa: E402
from parallel.compat.torch_checkpoint import read_checkpoints_as_data  # noqa: E402
from pretrain.checkpoint import bridge_format  # noqa: E402
from pretrain.checkpoint.output_guard import check_output, replace_output  # noqa: E402
from pretrain.checkpoint.run_state import RUN_STATE, TRACKER, CheckpointError, iter_dir, read_run_state  # noqa: E402

OURS_ONLY = {RUN_STATE, "rank_state"}  # per-rank RNG/data state and our run state: Bridge reads neither


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or no hard links there
        shutil.copy2(src, dst)


def write_metadata_in_gpt_layout(source: Path, target: Path) -> None:
    """`source`/.metadata with its keys renamed to GPTModel's layout, written to `target`/.metadata (the
    byte ranges it records are unchanged: the tensor files are the same)."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex

    read_checkpoints_as_data()  # the metadata is read as data (parallel/compat/torch_checkpoint.py)
    metadata = FileSystemReader(str(source)).read_metadata()
    if key_layout.layout_of(metadata.state_dict_metadata) == key_layout.HYBRID:
        metadata.state_dict_metadata = {key_layout.to_gpt(k): v for k, v in metadata.state_dict_metadata.items()}
        metadata.storage_data = {MetadataIndex(key_layout.to_gpt(i.fqn), i.offset, i.index): info
                                 for i, info in metadata.storage_data.items()}
    with open(target / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def export(load: str, save: str, iteration: int | None = None, force: bool = False) -> dict:
    iteration, state = read_run_state(load, iteration)
    if bridge_format.is_bridge_state(state):
        raise CheckpointError(f"--load {load} is already a Megatron-Bridge checkpoint")
    source = iter_dir(load, iteration)
    if not (source / ".metadata").exists():
        raise CheckpointError(f"--load {load}: {source} has no dist_checkpointing metadata (incomplete checkpoint)")
    cfg = GLM5Config.from_hf_dict(state["model_config"])
    # refuses what Bridge's config cannot say, before anything is written
    run_config = bridge_format.run_config_for(cfg, state.get("layout", {}))
    out = Path(save)
    # never the input, nor a directory holding a checkpoint, whatever --force says (pretrain/checkpoint/output_guard.py)
    check_output("--save", out, {"--load": load})
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"--save {out} exists and is not empty; pass --force to replace it")
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    try:
        target = iter_dir(partial, iteration)
        target.mkdir(parents=True)
        for f in sorted(source.iterdir()):
            if f.name not in OURS_ONLY and f.name != ".metadata" and f.is_file():
                _link_or_copy(f, target / f.name)
        write_metadata_in_gpt_layout(source, target)
        (target / bridge_format.RUN_CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
        train_state = bridge_format.train_state_for(iteration, state.get("consumed_samples", 0))
        torch.save(train_state, target / bridge_format.TRAIN_STATE)
        torch.save(train_state, partial / bridge_format.LATEST_TRAIN_STATE)
        (partial / TRACKER).write_text(str(iteration))
        replace_output("--save", partial, out, {"--load": load})
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return {"output": str(out), "iteration": iteration, "checkpoint": str(iter_dir(out, iteration)),
            "mtp_num_layers": run_config["model"]["mtp_num_layers"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="our checkpoint root (the --save of training)")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    p.add_argument("--save", required=True, help="the Megatron-Bridge checkpoint directory to create")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --save (never --load itself, nor a directory holding a checkpoint)")
    args = p.parse_args(argv)
    try:
        summary = export(args.load, args.save, args.iteration, args.force)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"export_bridge: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
