"""torch 2.13's distributed-checkpoint reader unpickles what a checkpoint directory holds, and unpickling
can run code: `.metadata` with `pickle.load` (`torch.distributed.checkpoint.filesystem.FileSystemReader
.read_metadata`, through that module's `pickle`) and every stored non-tensor item with
`torch.load(weights_only=False)` (`default_planner.DefaultLoadPlanner.load_bytes`; megatron-core 0.19.2's
MCoreLoadPlanner inherits it). megatron-core, our export and our tools all read through them.

`read_checkpoints_as_data()` (idempotent) makes both admit data only:
  - `.metadata`: an Unpickler whose `find_class` answers only the names torch's checkpoint metadata is
    made of (its dataclasses and enums, `_StorageInfo`, torch.Size, dtypes, layouts) and plain containers;
  - byte items: `torch.load(weights_only=True)`, torch's allowlist (tensors, plain containers) plus what
    megatron-core registers at import (`megatron.core.safe_globals.SAFE_GLOBALS`).
Anything else raises `CheckpointDataRefused` naming the file (and the item) before the name is resolved:
nothing from the file runs. `refusal_in(error)` finds it inside the exceptions torch wraps it in.
"""

from __future__ import annotations

import dataclasses
import enum
import pickle

_ORIGINAL_LOAD_BYTES = None  # DefaultLoadPlanner.load_bytes as torch defines it


class CheckpointDataRefused(pickle.UnpicklingError):
    """A checkpoint file asked the unpickler for something that is not checkpoint data."""


_PLAIN = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "bool", "str",
                                    "bytes", "complex", "slice")} | {
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
_DATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")


def metadata_allows(module: str, name: str) -> bool:
    """The names a torch distributed checkpoint's `.metadata` is made of (and nothing callable besides
    constructors of plain data)."""
    import importlib

    import torch

    if (module, name) in _PLAIN:
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
    if module in _DATA_MODULES:
        obj = getattr(importlib.import_module(module), name, None)
        return isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
    return False


class MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if not metadata_allows(module, name):
            raise CheckpointDataRefused(f"{self.where} asks to unpickle {module}.{name}, which is not checkpoint "
                                        "metadata: refused (unpickling it could run code)")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise CheckpointDataRefused(f"{self.where}: a persistent id in checkpoint metadata: refused")


class _PickleForReading:
    """Stands in for the `pickle` module inside torch's filesystem.py: its one `pickle.load` (the
    metadata) goes through MetadataUnpickler; every other name (`dump` for saving) is pickle's own."""

    def __getattr__(self, name):
        return getattr(pickle, name)

    @staticmethod
    def load(file, **_):
        return MetadataUnpickler(file, str(getattr(file, "name", "checkpoint metadata"))).load()


def load_data(value, where: str):
    """A stored non-tensor item, unpickled weights_only."""
    import torch

    try:
        return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        asked = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if asked:
            raise CheckpointDataRefused(f"{where} holds more than tensors and plain data: refused (unpickling it "
                                        f"could run code): {asked}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise pickle.UnpicklingError(f"{where} is not readable data (damaged?): {first}") from None


def _load_bytes(self, read_item, value) -> None:
    """DefaultLoadPlanner.load_bytes with a weights_only load (upstream: weights_only=False)."""
    from torch.distributed.checkpoint.default_planner import set_element  # the name upstream's body calls

    fqn = read_item.dest_index.fqn
    try:
        where = f"{self.metadata.storage_data[read_item.storage_index].relative_path} (item {fqn})"
    except (AttributeError, KeyError, TypeError):
        where = f"item {fqn}"
    obj = load_data(value, where)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[fqn], obj)
    else:
        self.state_dict[fqn] = obj


def read_checkpoints_as_data() -> None:
    """Patch torch's checkpoint reader (above); idempotent."""
    global _ORIGINAL_LOAD_BYTES
    from torch.distributed.checkpoint import default_planner, filesystem

    if not isinstance(filesystem.pickle, _PickleForReading):
        filesystem.pickle = _PickleForReading()
    if default_planner.DefaultLoadPlanner.load_bytes is not _load_bytes:
        _ORIGINAL_LOAD_BYTES = default_planner.DefaultLoadPlanner.load_bytes
        default_planner.DefaultLoadPlanner.load_bytes = _load_bytes


def refusal_in(error: BaseException) -> CheckpointDataRefused | None:
    """The refusal behind `error`: torch's CheckpointException keeps each rank's failure in `failures`."""
    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CheckpointDataRefused):
            return e
        failures = getattr(e, "failures", None)
        wrapped = [f[0] if isinstance(f, tuple) else f for f in failures.values()] if isinstance(failures, dict) else []
        stack += [e.__cause__, e.__context__, *wrapped]
    return None
