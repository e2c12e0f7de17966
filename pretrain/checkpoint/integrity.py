"""Is a published checkpoint intact? Checked from file sizes before anything is loaded, so a damaged one is
named (iteration, file, what is wrong) with the newest intact iteration and how to load it, instead of an
unpickling traceback from every rank mid-load.

A checkpoint directory's `.metadata` (torch distributed checkpoint) records, for every stored item, the file
and byte range it lives in: each file must exist and reach the end of its last range. `run_state.json` must
parse. The check reads the metadata and stats each file once (a few files per saving rank); rank 0 does it and
tells the others.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch.distributed as dist

from parallel.compat.torch_checkpoint import CheckpointDataRefused, read_checkpoints_as_data
from pretrain.checkpoint import bridge_format
from pretrain.checkpoint.run_state import RUN_STATE, CheckpointError, iter_dir, latest_iteration

_ITER = re.compile(r"^iter_(\d{7})$")


def damage(directory: Path) -> str | None:
    """What is wrong with the checkpoint in `directory` (naming the file), or None. A metadata file that
    asks for code raises CheckpointDataRefused (that is not damage)."""
    from torch.distributed.checkpoint import FileSystemReader

    read_checkpoints_as_data()
    state = directory / RUN_STATE
    try:
        json.loads(state.read_text())
    except FileNotFoundError:
        if not bridge_format.is_bridge_iteration(directory):  # Bridge's has run_config.yaml instead
            return f"{state} is missing (an incomplete checkpoint)"
    except (OSError, ValueError) as e:
        return f"{state} is unreadable ({e})"
    meta = directory / ".metadata"
    if not meta.exists():
        return f"{meta} is missing (an incomplete checkpoint)"
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except CheckpointDataRefused:
        raise
    except Exception as e:  # truncated or overwritten: EOFError, UnpicklingError, ...
        return f"{meta} is unreadable ({type(e).__name__}: {e})"
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path} is missing (an incomplete checkpoint)"
        if size < end:
            return f"{path} is truncated ({size} bytes; the metadata places data up to byte {end})"
    return None


def intact_iterations(root: str | Path, below: int | None = None) -> list[int]:
    """Published iterations under `root` (below `below`), newest first, that pass the check."""
    root = Path(root)
    found = sorted((int(m.group(1)) for p in root.iterdir() if (m := _ITER.match(p.name))), reverse=True)
    out = []
    for iteration in found:
        if below is not None and iteration >= below:
            continue
        try:
            if damage(iter_dir(root, iteration)) is None:
                out.append(iteration)
                break  # the newest is what the advice needs
        except CheckpointDataRefused:
            continue
    return out


def advice(root: str | Path, below: int | None) -> str:
    intact = intact_iterations(root, below)
    if not intact:
        return "no older intact checkpoint is there"
    return f"the newest intact iteration is {intact[0]}: load it with --ckpt-step {intact[0]}"


def iteration_to_load(root: str, ckpt_step: int | None) -> int | None:
    """--ckpt-step, else the tracker's (None: no checkpoint there); a tracker pointing at a missing or
    incomplete iteration is refused with the newest intact one."""
    if ckpt_step is not None:
        if not iter_dir(root, ckpt_step).is_dir():
            raise CheckpointError(f"--ckpt-step {ckpt_step}: {iter_dir(root, ckpt_step)} does not exist; "
                                  f"{advice(root, None)}")
        return ckpt_step
    try:
        return latest_iteration(root)
    except CheckpointError as e:
        raise CheckpointError(f"--load {root}: {e}; {advice(root, None)}") from None


def check_intact(root: str, iteration: int, device) -> None:
    """Refuse a damaged checkpoint before loading it (collective: rank 0 checks, every rank raises)."""
    problem = None
    if dist.get_rank() == 0:
        try:
            found = damage(iter_dir(root, iteration))
            if found:
                problem = f"--load {root}: iteration {iteration} is damaged: {found}; {advice(root, iteration)}"
        except CheckpointDataRefused as e:
            problem = f"--load {root}: iteration {iteration}: {e}"
    box = [problem]
    dist.broadcast_object_list(box, src=0, device=device)
    if box[0]:
        raise CheckpointError(box[0])
