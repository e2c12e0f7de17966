"""What a checkpoint records besides its tensors, and how a written checkpoint becomes visible: one
definition, used by training (pretrain/checkpoint/checkpointer.py) and by the HF import (tools/import_hf.py).
A Megatron-Bridge checkpoint (run_config.yaml instead of run_state.json) reads as a weights-only one
(pretrain/checkpoint/bridge_format.py).

    SAVE/latest_checkpointed_iteration.txt      the pointer, moved last (atomic replace)
    SAVE/iter_0000100/                          tensors (dist_checkpointing), rank_state/
                     /run_state.json            a RunState
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from pretrain.checkpoint import bridge_format

TRACKER = "latest_checkpointed_iteration.txt"
RUN_STATE = "run_state.json"
# 2: the DSA indexer's heads stored RoPE dims first, as transformers and megatron-core 0.19.2 keep them
# (model/hf_mapping.py INDEXER_ROPE_FIRST_SINCE); a format-1 checkpoint is converted as it loads
# (pretrain/checkpoint/upgrade.py).
FORMAT_VERSION = 2


class CheckpointError(RuntimeError):
    pass


@dataclasses.dataclass
class Progress:
    """The trainer's counters: what a resumed run continues from."""

    iteration: int = 0
    consumed_tokens: int = 0
    consumed_samples: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, int(state[field.name]))


@dataclasses.dataclass
class RunState:
    """run_state.json. Fields that a kind of checkpoint does not have stay None and are not written
    (an HF import has no scheduler, data position or engine)."""

    iteration: int
    consumed_tokens: int
    consumed_samples: int
    model_config: dict
    layout: dict
    world_size: int
    format_version: int = FORMAT_VERSION
    weights_only: bool | None = None  # an HF import: model weights only, the rest starts fresh
    scheduler: dict | None = None
    data: dict | None = None  # the global data position (the same for every rank)
    dp_engine: str | None = None
    distributed_optimizer: bool | None = None
    optimizer: str | None = None  # --optimizer (absent: adam)
    preset: str | None = None
    seq_length: int | None = None
    source: dict | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, obj: dict) -> "RunState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})


def layout_of(dims) -> dict:
    layout = {"tp": dims.tp, "pp": dims.pp, "cp": dims.cp, "ep": dims.ep, "etp": dims.expert_tp, "dp": dims.dp,
              "vpp": dims.layers_per_virtual_stage, "sp": dims.sequence_parallel}
    if dims.pipeline_layout is not None:  # only then: a run without one matches checkpoints without the key
        layout["pp_layout"] = dims.pipeline_layout
    if getattr(dims, "hybrid_pattern", None) is not None:  # --hybrid-layer-pattern: its '|' are the stages
        layout["hybrid_pattern"] = dims.hybrid_pattern
    return layout


def iter_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def partial_dir(root: str | Path, iteration: int) -> Path:
    """Where iteration `iteration` is written before it is published."""
    final = iter_dir(root, iteration)
    return final.with_name(final.name + ".partial")


def latest_iteration(root: str | Path) -> int | None:
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}") from None
    directory = iter_dir(root, iteration)
    if not (directory / RUN_STATE).exists() and not bridge_format.is_bridge_iteration(directory):
        raise CheckpointError(f"{tracker} points at iteration {iteration}, but {directory} is missing or incomplete")
    return iteration


def read_run_state(root: str, iteration: int | None = None) -> tuple[int, dict]:
    """(iteration, run_state.json as written) of the latest checkpoint under `root`, or of `iteration`."""
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"--load {root}: no {TRACKER} (no complete checkpoint there)")
    path = iter_dir(root, iteration) / RUN_STATE
    if not path.exists() and bridge_format.is_bridge_iteration(path.parent):
        try:
            return iteration, bridge_format.run_state(root, iteration)
        except bridge_format.BridgeFormatError as e:
            raise CheckpointError(f"--load {root}: {e}") from None
    if not path.exists():
        raise CheckpointError(f"--load {root}: {path} is missing (incomplete checkpoint)")
    return iteration, json.loads(path.read_text())


def write_run_state(directory: Path, state: RunState) -> None:
    """Rank 0 only; atomic (a crash leaves no half-written file)."""
    path = directory / RUN_STATE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2, sort_keys=True))
    os.replace(tmp, path)


def publish(root: str | Path, iteration: int) -> Path:
    """Every rank's files of `iter_N.partial` are written: rename it to `iter_N`, then move the pointer
    (collective: every rank calls it; rank 0 acts). A crash at any moment leaves the previous
    checkpoint as the latest and no directory that --load would take for complete."""
    root, final = Path(root), iter_dir(root, iteration)
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial_dir(root, iteration), final)
        (root / (TRACKER + ".tmp")).write_text(f"{iteration}\n")
        os.replace(root / (TRACKER + ".tmp"), root / TRACKER)
        print(f"saved checkpoint {final}", flush=True)
    dist.barrier()
    return final
