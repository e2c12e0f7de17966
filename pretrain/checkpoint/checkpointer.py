"""Distributed checkpoints with megatron-core's dist_checkpointing, in Megatron-LM's layout
(pretrain/checkpoint/run_state.py):

    SAVE/latest_checkpointed_iteration.txt      the pointer, moved last (atomic replace)
    SAVE/iter_0000100/                          model + engine state (sharded, reshardable)
                     /run_state.json            iteration, tokens, scheduler, data position, config
                     /rank_state/rank_00003.pt  per-rank RNG, data-reader and engine state (the
                                                engine's: DeepSpeed's ZeRO partition)

A checkpoint is written into `iter_N.partial/`, every rank syncs, rank 0 renames it to `iter_N`
and only then moves the pointer: a crash at any moment leaves the previous checkpoint as the
latest and no directory that `--load` would take for complete.

What is saved comes from the run's stateful parts (`CheckpointParts`): the model chunks, the engine
(pretrain/engine/megatron.py), the LR/WD scheduler, the data loader and the trainer's counters; none of
them is asked what it is.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException

from model import hf_mapping
from parallel.compat.megatron_checkpoint import results_queue_dies_with_us
from parallel.compat.torch_checkpoint import read_checkpoints_as_data, refusal_in
from parallel.runtime import every_rank
from pretrain.checkpoint import bridge_format, extra_state
from pretrain.resilience import faults
from pretrain.checkpoint.integrity import advice, check_intact, iteration_to_load
from pretrain.checkpoint.upgrade import stored_key_layout, upgrade_request
from pretrain.engine.optimizer import schedule_differences
from pretrain.checkpoint.stages import LoadOptions
from pretrain.checkpoint.run_state import (
    TRACKER, CheckpointError, Progress, RunState, iter_dir, latest_iteration, partial_dir, publish, read_run_state,
    write_run_state)

__all__ = ["TRACKER", "SHARDING_METADATA", "CheckpointError", "CheckpointParts", "Checkpointer", "check_writable",
           "iter_dir", "latest_iteration", "load", "model_sharded_state", "read_run_state", "save"]

# Reshardable optimizer state (any TP/PP/EP/DP change), keys independent of the expert/dense split.
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


@dataclasses.dataclass
class CheckpointParts:
    """What a checkpoint holds, one stateful part each. `engine`, `scheduler`, `data` are None for a
    weights-only checkpoint (an HF import)."""

    model: list  # model chunks (wrapped or not: the keys are the unwrapped module's)
    progress: Progress
    engine: object = None
    scheduler: object = None
    data: object = None


def _unwrap(chunk):
    while hasattr(chunk, "module"):  # DDP / Float16Module / the DeepSpeed view: keys without "module."
        chunk = chunk.module
    return chunk


def _model_keys(model) -> list[str]:
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def model_sharded_state(model) -> dict:
    return {key: _unwrap(chunk).sharded_state_dict(metadata=SHARDING_METADATA)
            for key, chunk in zip(_model_keys(model), model)}


def _load_model(model, loaded: dict) -> None:
    for key, chunk in zip(_model_keys(model), model):
        _unwrap(chunk).load_state_dict(loaded[key])


def check_writable(root: str, device: torch.device) -> None:
    """Refuse an unusable --save before any work (every rank calls it; rank 0 probes)."""
    problem = ""
    if dist.get_rank() == 0:
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            probe = Path(root) / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            problem = f"--save {root} is not a writable directory: {e.strerror or e}"
    if not every_rank(not problem, device):
        raise CheckpointError(problem or f"--save {root} is not a writable directory (see rank 0)")


def _rank_state(parts: CheckpointParts) -> dict:
    state = {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker_rng": get_cuda_rng_tracker().get_states(),
        "data": parts.data.state_dict(),
    }
    engine_state = parts.engine.rank_state_dict()
    if engine_state is not None:
        state["optimizer"] = engine_state
    return state


def save(root: str, parts: CheckpointParts, run_info: dict, device: torch.device, async_queue=None) -> Path:
    """Save a complete checkpoint of `parts.progress.iteration` (collective: every rank calls it).
    `run_info`: the run's RunState fields that no part holds (model config, layout, ...).

    Any failure (a full disk, a vanished directory) leaves no `iter_N` and the pointer where it
    was, and raises CheckpointError on every rank.

    With `async_queue` (megatron-core's AsyncCallsQueue, --async-save) the tensors are staged
    in host memory here and written by a background process while training goes on; the rename
    and the pointer move happen when the queue finalizes the write on every rank."""
    iteration = parts.progress.iteration
    partial = partial_dir(root, iteration)
    rank = dist.get_rank()
    weights_only = parts.engine is None
    error = None
    try:
        if rank == 0:
            Path(root).mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)  # empty: dist_checkpointing calls a non-empty one corrupted
    except OSError as e:
        error = e
    if not every_rank(error is None, device):
        raise CheckpointError(f"--save {root}: cannot create {partial}: {error or 'see rank 0'}")

    state = model_sharded_state(parts.model)
    if not weights_only:
        state.update(parts.engine.sharded_state_dict(state, is_loading=False))
    # The global data position: a collective (every rank's streams), before any rank's file I/O.
    run_state = RunState(**parts.progress.state_dict(), **run_info, world_size=dist.get_world_size(),
                         **({} if weights_only else dict(
                             scheduler=parts.scheduler.state_dict(), data=parts.data.global_state_dict(),
                             **parts.engine.describe())))
    results_queue_dies_with_us()
    # async_strategy "mcore": megatron-core's own writer (parallel/compat/megatron_checkpoint.py patches its
    # results queue); 0.19's default "nvrx" needs nvidia-resiliency-ext
    request = dist_checkpointing.save(state, str(partial), async_sharded_save=async_queue is not None,
                                      async_strategy="mcore")
    try:
        if not weights_only:
            (partial / "rank_state").mkdir(exist_ok=True)
            torch.save(_rank_state(parts), partial / "rank_state" / f"rank_{rank:05d}.pt")
        faults.inject("save-shards")
        faults.inject(f"save-shards-{iteration}")
        if rank == 0:
            write_run_state(partial, run_state)
    except OSError as e:
        error = e
    if not every_rank(error is None, device):
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(f"--save {root}: writing iteration {iteration} failed ({error or 'on another rank'}); "
                              f"the previous checkpoint (iteration {latest_iteration(root)}) is intact")
    if async_queue is not None:
        request.add_finalize_fn(lambda: publish(root, iteration))
        async_queue.schedule_async_request(request)
        return iter_dir(root, iteration)
    return publish(root, iteration)


def load(root: str, parts: CheckpointParts, model_config: dict, layout: dict,
         options: LoadOptions = LoadOptions()) -> dict:
    """Load the latest checkpoint under `root` (or --ckpt-step's) into the parts; returns its run state (as
    written), with "notes": what this load left fresh and why (pretrain/checkpoint/stages.py)."""
    read_checkpoints_as_data()  # nothing in the checkpoint runs (parallel/compat/torch_checkpoint.py)
    iteration, saved = read_run_state(root, options.ckpt_step)
    notes = list(saved.get("notes", []))  # a Megatron-Bridge checkpoint's: what is not taken over
    if bridge_format.is_bridge_state(saved):  # run_config.yaml holds part of the config; MTP may be absent
        diff, config_notes = bridge_format.config_differences(saved, model_config)
        notes += config_notes
    else:
        theirs, ours = saved.get("model_config", {}), model_config
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if diff:
        raise CheckpointError(f"--load {root}: the checkpoint's model config differs from this run's in {diff}")
    directory = iter_dir(root, iteration)
    notes += [note] if (note := options.describe()) else []
    upgrade = partial(upgrade_request, checkpoint_format=saved.get("format_version"), dims=_dims(model_config),
                      stored_layout=stored_key_layout(directory))
    if saved.get("weights_only") or options.finetune:
        # Model weights only (tools/import_hf.py, --finetune): optimizer, scheduler, data position and RNG start
        # fresh, at iteration 0.
        _load_model(parts.model, extra_state.load(upgrade(model_sharded_state(parts.model)), directory,
                                                  fresh=bridge_format.fresh_prefixes(saved, model_config)))
        parts.engine.reload_model_params()
        return {**saved, "notes": notes}
    load_optim = not options.no_load_optim
    differ = schedule_differences(parts.scheduler, saved["scheduler"]) if load_optim else []
    if differ:
        raise CheckpointError(
            f"--load {root}: this run's learning-rate schedule differs from iteration {iteration}'s "
            f"({'; '.join(differ)}). Say which wins: --override-opt_param-scheduler (this run's flags, "
            "e.g. to extend a run with a longer --train-iters) or --use-checkpoint-opt_param-scheduler "
            "(the checkpoint's schedule); or start this run's optimizer and schedule fresh: --no-load-optim")
    same_layout = saved.get("layout") == layout
    request = model_sharded_state(parts.model)
    if load_optim:
        parts.engine.check_resumable(saved, layout, where=f"--load {root}: iteration {iteration}")
        request.update(parts.engine.sharded_state_dict(request, is_loading=True))
        parts.engine.prepare_load(request, directory, saved)
    loaded = extra_state.load(upgrade(request), directory)  # written by either transformer implementation
    _load_model(parts.model, loaded)
    if "optimizer" in request:
        parts.engine.load_sharded(loaded, request, saved, same_layout)
    if load_optim:  # (DeepSpeed's optimizer state is in the rank files: no "optimizer" in the request)
        parts.scheduler.load_state_dict(saved["scheduler"])
    else:
        parts.engine.reload_model_params()

    rank_file = directory / "rank_state" / f"rank_{dist.get_rank():05d}.pt"
    rank_state = _read_rank_state(rank_file) if same_layout and rank_file.exists() else None
    if rank_state is not None and not options.no_load_rng:
        torch.set_rng_state(rank_state["torch_rng"])
        if torch.cuda.is_available() and rank_state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(rank_state["cuda_rng"])
        get_cuda_rng_tracker().set_states(rank_state["tracker_rng"])
    if rank_state is not None and load_optim and "optimizer" in rank_state:
        parts.engine.load_rank_state_dict(rank_state["optimizer"])
    # The data position: this rank's at the same layout, else the global one (the same for every rank);
    # only for the data configuration it was saved with.
    changed = _data_changes(saved.get("data"), parts.data.state_dict())
    if changed:
        notes.append(f"the data position starts fresh: {changed} (the checkpoint's position belongs to its own data)")
    elif rank_state is not None:
        parts.data.load_state_dict(rank_state["data"])
    else:
        parts.data.load_state_dict(saved["data"])
    parts.progress.load_state_dict(saved)
    return {**saved, "notes": notes}


def _data_changes(saved: dict | None, ours: dict) -> str:
    """What differs between the data configuration a position was saved for and this run's ("" if none)."""
    if not saved:
        return ""
    keys = [k for k in ours if k not in ("step", "streams", "consumed_samples")]
    differ = [k for k in keys if saved.get(k) != ours[k]]
    if not differ:
        return ""
    show = {"datasets": "the data blend (--data-path)", "seq_length": "--seq-length",
            "global_batch_size": "--global-batch-size", "rampup_batch_size": "--rampup-batch-size",
            "num_streams": "the reader's streams", "seed": "--seed"}
    return "; ".join(f"{show.get(k, k)} {saved.get(k)!r} -> {ours[k]!r}" if k != "datasets" else
                     f"{show[k]} changed" for k in differ)


def _dims(model_config: dict) -> hf_mapping.Dims:
    from model.config_flash import config_from_hf_dict

    return hf_mapping.Dims.of(config_from_hf_dict(model_config), padded_vocab_size=0)  # the indexer's only


def _rank_state_globals() -> list:
    """The classes a rank-state file holds besides tensors and plain data: DeepSpeed ZeRO's stage
    enum, loss scaler and partition map (--dp-engine deepspeed)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def _read_rank_state(path: Path) -> dict:
    """A rank's RNG, data and ZeRO state, unpickled without running code from the file (weights_only)."""
    try:
        with torch.serialization.safe_globals(_rank_state_globals()):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"--load: {path} holds more than tensors and plain data, and is not unpickled "
                              f"(it could run code): {reason}") from None
    except (EOFError, RuntimeError) as e:  # a truncated file: torch's zip reader
        raise CheckpointError(f"--load: {path} is damaged ({type(e).__name__}: {e})") from None


def _first_failure(error) -> str:
    failures = [f[0] if isinstance(f, tuple) else f for f in getattr(error, "failures", {}).values()]
    first = failures[0] if failures else error
    text = str(first).strip().splitlines()
    return f"{type(first).__name__}: {text[0] if text else ''}"


class Checkpointer:
    """The trainer's saves and loads: the parts, the run's facts, and --async-save's queue."""

    def __init__(self, parts: CheckpointParts, run_info: dict, device: torch.device, save_dir: str | None,
                 async_save: bool = False):
        self.parts, self.run_info, self.device, self.save_dir = parts, run_info, device, save_dir
        self.async_queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()

    def load(self, root: str, options: LoadOptions = LoadOptions()) -> dict:
        iteration = iteration_to_load(root, options.ckpt_step)
        check_intact(root, iteration, self.device)  # before any advice about flags
        try:
            return load(root, self.parts, self.run_info["model_config"], self.run_info["layout"], options)
        except BaseException as e:  # torch's CheckpointException is a BaseException
            refused = refusal_in(e)
            if refused is not None:
                raise CheckpointError(f"--load {root}: iteration {iteration}: {refused}") from None
            if isinstance(e, CheckpointException):  # bytes damaged in place (the sizes were right)
                raise CheckpointError(f"--load {root}: iteration {iteration} could not be read: "
                                      f"{_first_failure(e)}; {advice(root, iteration)}") from None
            raise

    def save(self) -> None:
        if self.async_queue is not None:
            self.finish(blocking=True)  # one save in flight at a time
        with self.parts.engine.saving():
            save(self.save_dir, self.parts, self.run_info, self.device, self.async_queue)

    def finish(self, blocking: bool) -> None:
        """Publish the background saves that are done on every rank (a collective)."""
        if self.async_queue is None:
            return
        try:
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)
        except Exception as e:  # megatron raises the writer's failure on every rank
            raise CheckpointError(
                f"--save {self.save_dir}: a background save failed ({e}); the checkpoint before it is intact") from e
