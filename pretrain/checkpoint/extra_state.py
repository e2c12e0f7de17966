"""Load a checkpoint written by the other transformer implementation (TE <-> megatron-core local).

Both backends name every weight the same (model/specs.py), but each module also saves an
`_extra_state` object, and the two do not have the same set: TE's norms, its indexer linears and
its grouped experts carry FP8 scaling state where the local modules have none. Loading a local (or
HF-imported, or CPU) checkpoint into a TE run therefore asks for objects the checkpoint lacks, and
dist_checkpointing refuses. Those objects are FP8 metadata, not weights: a module whose extra state
is absent from the checkpoint keeps its own (fresh FP8 scaling history, as at the start of a run).
The other way round needs nothing: a checkpoint's objects nobody asks for are ignored.
"""

from __future__ import annotations

from pathlib import Path

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, extract_matching_values, merge
from megatron.core.dist_checkpointing.mapping import ShardedObject


def is_extra_state(key: str) -> bool:
    return key.endswith("._extra_state") or "._extra_state/" in key


def absent_extra_state(request: dict, stored_keys) -> list[str]:
    """The `_extra_state` objects of `request` that a checkpoint lacks (`stored_keys`: its unique keys,
    as load_sharded_metadata gives them)."""
    stored = set(stored_keys)
    absent, _ = _split(request, stored)
    found = []
    dict_list_map_inplace(lambda v: found.append(v.key) or v, absent)
    return sorted(found)


def _split(request: dict, stored: set) -> tuple[dict, dict]:
    return extract_matching_values(
        request, lambda v: isinstance(v, ShardedObject) and is_extra_state(v.key) and v.unique_key not in stored)


def load(request: dict, directory: str | Path, fresh: tuple[str, ...] = ()) -> dict:
    """dist_checkpointing.load of `request`, where an `_extra_state` object that the checkpoint
    lacks comes back as the module's current one (so `load_state_dict` stays strict). So do the
    tensors whose keys start with one of `fresh` (a part the checkpoint does not hold, which the
    caller decided starts from this run's initialization: pretrain/checkpoint/bridge_format.py's MTP layer)."""
    stored = load_sharded_metadata(str(directory))
    absent, present = _split(request, set(stored))
    if fresh:
        kept, present = extract_matching_values(present, lambda v: hasattr(v, "key") and v.key.startswith(fresh))
        absent = merge(absent, kept) if absent else kept
    loaded = dist_checkpointing.load(present, str(directory))
    _check_fp8_states(loaded, directory)
    if absent:
        merge(loaded, dict_list_map_inplace(lambda v: v.data, absent))
    return loaded


def _check_fp8_states(tree, directory) -> None:
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        if isinstance(key, str) and is_extra_state(key):
            _fp8_state_is_data(value, f"{directory} ({key})")
        else:
            _check_fp8_states(value, directory)


def _fp8_state_is_data(value, where: str) -> None:
    """Transformer Engine's `set_extra_state` unpickles a byte tensor with `pickle.loads` (TE 2.x): a loaded
    one must unpickle with megatron-core's allowlist for FP8 extra state (SafeUnpickler), else it is refused
    here, before TE sees it. Other values pass unchanged."""
    import io
    import pickle

    import torch
    from megatron.core.safe_globals import SafeUnpickler

    from parallel.compat.torch_checkpoint import CheckpointDataRefused

    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.numel() and value.dim() == 1:
        try:
            SafeUnpickler(io.BytesIO(value.detach().cpu().numpy().tobytes())).load()
        except pickle.UnpicklingError as e:
            raise CheckpointDataRefused(f"{where}: an FP8 extra state holds more than FP8 metadata: refused "
                                        f"(unpickling it could run code): {e}") from None
        except Exception:
            pass  # not a pickle: TE's own unpickling fails on it too, before anything runs
