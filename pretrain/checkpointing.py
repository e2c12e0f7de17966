"""Distributed checkpoints with megatron-core's dist_checkpointing, in Megatron-LM's layout:

    SAVE/latest_checkpointed_iteration.txt      the pointer, moved last (atomic replace)
    SAVE/iter_0000100/                          model + optimizer (sharded, reshardable)
                     /run_state.json            iteration, tokens, scheduler, data position, config
                     /rank_state/rank_00003.pt  per-rank RNG and data-reader state (and, under
                                                --dp-engine deepspeed, the rank's ZeRO partition)

A checkpoint is written into `iter_N.partial/`, every rank syncs, rank 0 renames it to `iter_N`
and only then moves the pointer: a crash at any moment leaves the previous checkpoint as the
latest and no directory that `--load` would take for complete.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from pretrain import extra_state, faults
from pretrain.optim import schedule_differences

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1
# Reshardable optimizer state (any TP/PP/EP/DP change), keys independent of the expert/dense split.
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


class CheckpointError(RuntimeError):
    pass


def iter_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> int | None:
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}") from None
    if not (iter_dir(root, iteration) / "run_state.json").exists():
        raise CheckpointError(f"{tracker} points at iteration {iteration}, but {iter_dir(root, iteration)} "
                              "is missing or incomplete")
    return iteration


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)  # keys without DDP's "module." prefix


def sharded_state(model, optimizer, is_loading: bool) -> dict:
    state = {}
    for i, chunk in enumerate(map(_unwrap, model)):
        state[_model_key(i, len(model))] = chunk.sharded_state_dict(metadata=SHARDING_METADATA)
    if optimizer is not None and _is_sharded(optimizer):
        # The nested {model0: ..., model1: ...} of interleaved pipelining, not a merged dict: the
        # chunks' keys are local to each chunk and would overwrite each other.
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading,
                                                          metadata=SHARDING_METADATA)
    return state


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _is_sharded(optimizer) -> bool:
    """megatron-core's optimizers save sharded, reshardable state; DeepSpeed's ZeRO saves per rank."""
    return hasattr(optimizer, "sharded_state_dict")


def _rank_state(data, optimizer) -> dict:
    state = {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker_rng": get_cuda_rng_tracker().get_states(),
        "data": data.state_dict(),
    }
    if optimizer is not None and not _is_sharded(optimizer):
        state["optimizer"] = optimizer.state_dict()
    return state


def _die_with_parent() -> None:
    """Runs in the queue's server process: end it when its parent dies (Linux prctl)."""
    import ctypes
    import signal as _signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, _signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


_QUEUE_MANAGER = None


def _results_queue_dies_with_us() -> None:
    """megatron-core's checkpoint writer collects results through a multiprocessing Manager queue:
    a server process that would outlive a SIGKILLed trainer, orphaned, holding the job's output
    open. Create that manager ourselves, with a server that dies with its parent."""
    global _QUEUE_MANAGER
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        _QUEUE_MANAGER = SyncManager(ctx=multiprocessing.get_context("spawn"))
        _QUEUE_MANAGER.start(initializer=_die_with_parent)
        filesystem_async._results_queue = _QUEUE_MANAGER.Queue()


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
    if not _agree(not problem, device):
        raise CheckpointError(problem or f"--save {root} is not a writable directory (see rank 0)")


def _sub_optimizers(optimizer) -> list:
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _is_distributed(optimizer) -> bool:
    return optimizer is not None and type(_sub_optimizers(optimizer)[0]).__name__ == "DistributedOptimizer"


def _engine(optimizer) -> str:
    return "megatron" if optimizer is None or _is_sharded(optimizer) else "deepspeed"


def _agree(ok: bool, device: torch.device) -> bool:
    """True only when every rank is ok (a collective, on the runtime's device: NCCL takes no CPU tensor)."""
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save(root: str, iteration: int, *, model, optimizer, scheduler, data, run_state: dict, device: torch.device,
         async_queue=None) -> Path:
    """Save a complete checkpoint of iteration `iteration` (collective: every rank calls it).

    Any failure (a full disk, a vanished directory) leaves no `iter_N` and the pointer where it
    was, and raises CheckpointError on every rank.

    With `async_queue` (megatron-core's AsyncCallsQueue, --async-save) the tensors are staged
    in host memory here and written by a background process while training goes on; the rename
    and the pointer move happen when the queue finalizes the write on every rank (the trainer
    polls it each iteration and waits for it before exiting)."""
    root_path = Path(root)
    final = iter_dir(root_path, iteration)
    partial = final.with_name(final.name + ".partial")
    rank = dist.get_rank()
    error = None
    try:
        if rank == 0:
            root_path.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)  # empty: dist_checkpointing calls a non-empty one corrupted
    except OSError as e:
        error = e
    if not _agree(error is None, device):
        raise CheckpointError(f"--save {root}: cannot create {partial}: {error or 'see rank 0'}")

    _results_queue_dies_with_us()
    request = dist_checkpointing.save(sharded_state(model, optimizer, is_loading=False), str(partial),
                                      async_sharded_save=async_queue is not None)
    try:
        (partial / "rank_state").mkdir(exist_ok=True)
        torch.save(_rank_state(data, optimizer), partial / "rank_state" / f"rank_{rank:05d}.pt")
        faults.inject("save-shards")
        faults.inject(f"save-shards-{iteration}")
        if rank == 0:
            state = dict(run_state, iteration=iteration, format_version=FORMAT_VERSION,
                         distributed_optimizer=_is_distributed(optimizer), dp_engine=_engine(optimizer),
                         scheduler=scheduler.state_dict(), world_size=dist.get_world_size())
            _write_json_atomic(partial / "run_state.json", state)
    except OSError as e:
        error = e
    if not _agree(error is None, device):
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(f"--save {root}: writing iteration {iteration} failed ({error or 'on another rank'}); "
                              f"the previous checkpoint (iteration {latest_iteration(root)}) is intact")
    if async_queue is not None:
        request.add_finalize_fn(lambda: _publish(root_path, partial, final, iteration))
        async_queue.schedule_async_request(request)
    else:
        _publish(root_path, partial, final, iteration)
    return final


def _publish(root: Path, partial: Path, final: Path, iteration: int) -> None:
    """Every rank's files are written: rename the directory, then move the pointer."""
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        (root / (TRACKER + ".tmp")).write_text(f"{iteration}\n")
        os.replace(root / (TRACKER + ".tmp"), root / TRACKER)
        print(f"saved checkpoint {final}", flush=True)
    dist.barrier()


def read_run_state(root: str, iteration: int | None = None) -> tuple[int, dict]:
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"--load {root}: no {TRACKER} (no complete checkpoint there)")
    path = iter_dir(root, iteration) / "run_state.json"
    if not path.exists():
        raise CheckpointError(f"--load {root}: {path} is missing (incomplete checkpoint)")
    return iteration, json.loads(path.read_text())


def load(root: str, *, model, optimizer, scheduler, data, model_config: dict, layout: dict) -> dict:
    """Load the latest checkpoint under `root` into this rank's objects; returns its run state."""
    iteration, state = read_run_state(root)
    if state.get("model_config") != model_config:
        theirs, ours = state.get("model_config", {}), model_config
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise CheckpointError(f"--load {root}: the checkpoint's model config differs from this run's in {diff}")
    differ = [] if state.get("weights_only") else schedule_differences(scheduler, state["scheduler"])
    if differ:
        raise CheckpointError(
            f"--load {root}: this run's learning-rate schedule differs from iteration {iteration}'s "
            f"({'; '.join(differ)}). Say which wins: --override-opt_param-scheduler (this run's flags, "
            "e.g. to extend a run with a longer --train-iters) or --use-checkpoint-opt_param-scheduler "
            "(the checkpoint's schedule)")
    directory = iter_dir(root, iteration)
    if state.get("weights_only"):
        # Model weights only (tools/import_hf.py): optimizer, scheduler, data position and RNG start fresh.
        loaded = extra_state.load(sharded_state(model, None, is_loading=True), directory)
        for i, chunk in enumerate(map(_unwrap, model)):
            chunk.load_state_dict(loaded[_model_key(i, len(model))])
        if optimizer is not None:
            optimizer.reload_model_params()  # fp32 main copies (bf16, ZeRO) were made from the init
        return state
    same_layout = state.get("layout") == layout
    saved_engine = state.get("dp_engine", "megatron")
    if optimizer is not None and saved_engine != _engine(optimizer):
        raise CheckpointError(f"--load {root}: iteration {iteration} holds {saved_engine}'s optimizer state, "
                              f"this run uses --dp-engine {_engine(optimizer)}: resume with --dp-engine {saved_engine}")
    if saved_engine == "deepspeed" and not same_layout:
        raise CheckpointError(f"--load {root}: iteration {iteration} holds DeepSpeed ZeRO state partitioned for "
                              f"the layout {state.get('layout')}; resume at that layout (this run: {layout})")
    if optimizer is not None and _is_sharded(optimizer):
        _materialize_adam_state(optimizer)
        _load_steps_apart(optimizer)
    request = sharded_state(model, optimizer, is_loading=True)
    # Saved without --use-distributed-optimizer, loaded with it: its fp32 main parameters come from
    # the plain optimizer's fp32 copies (bf16) or the fp32 weights themselves.
    switched = _is_distributed(optimizer) and not state.get("distributed_optimizer", False)
    if switched:
        _main_params_from_plain_checkpoint(request["optimizer"], directory)
    loaded = extra_state.load(request, directory)  # written by either transformer implementation
    for i, chunk in enumerate(map(_unwrap, model)):
        chunk.load_state_dict(loaded[_model_key(i, len(model))])
    if optimizer is not None and _is_sharded(optimizer):
        opt_state = loaded["optimizer"]
        if switched:
            _fill_from_weights(opt_state, request, loaded)
        if not same_layout or switched:
            opt_state = _conform_optimizer_state(request["optimizer"], opt_state)
        optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(state["scheduler"])

    rank_file = directory / "rank_state" / f"rank_{dist.get_rank():05d}.pt"
    if same_layout and rank_file.exists():
        rank_state = _read_rank_state(rank_file)
        torch.set_rng_state(rank_state["torch_rng"])
        if torch.cuda.is_available() and rank_state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(rank_state["cuda_rng"])
        get_cuda_rng_tracker().set_states(rank_state["tracker_rng"])
        data.load_state_dict(rank_state["data"])
        if optimizer is not None and not _is_sharded(optimizer):
            optimizer.load_state_dict(rank_state["optimizer"])
    else:
        # Another layout: the data position is global (the same for every rank), RNG is reseeded.
        data.load_state_dict(state["data"])
    return state


_MAIN_PARAM = "optimizer.state.param."  # the distributed optimizer's fp32 main parameters


class _FromWeight(tuple):
    """Placeholder in a load request: fill with the loaded model weight of this (checkpoint key,
    global offset): the local experts of a layer share one key, at different offsets."""


def _main_params_from_plain_checkpoint(request, directory: Path) -> None:
    """Point the distributed optimizer's main-parameter requests at what a plain optimizer saved:
    `optimizer.state.fp32_param.X` (bf16 training), or, in fp32 training, the weight `X` itself,
    which the model part of the same load already reads (a key may be loaded once: a placeholder
    here, filled by `_fill_from_weights`)."""
    from torch.distributed.checkpoint import FileSystemReader

    saved = set(FileSystemReader(str(directory)).read_metadata().state_dict_metadata)

    def redirect(v):
        if not (isinstance(v, ShardedBase) and v.key.startswith(_MAIN_PARAM) and v.key not in saved):
            return v
        name = v.key[len(_MAIN_PARAM):]
        if "optimizer.state.fp32_param." + name in saved:
            v.key = "optimizer.state.fp32_param." + name
            return v
        return LocalNonpersistentObject(_FromWeight((name, _offset(v))))

    dict_list_map_inplace(redirect, request)


def _offset(sharded) -> tuple:
    """Where a sharded tensor sits in its key's global tensor; for a factory (SwiGLU's split fc1),
    where the first tensor it builds sits."""
    if hasattr(sharded, "global_offset"):
        return tuple(sharded.global_offset)
    if hasattr(sharded, "build"):
        built = sharded.build()
        parts = built.values() if isinstance(built, dict) else built if isinstance(built, (list, tuple)) else [built]
        return next((_offset(part) for part in parts if isinstance(part, ShardedBase)), ())
    return ()


def _fill_from_weights(loaded_optimizer, request: dict, loaded: dict) -> None:
    by_key = {}

    def index(req, got):
        if isinstance(req, ShardedBase):
            by_key[(req.key, _offset(req))] = got
        elif isinstance(req, dict):
            for k, v in req.items():
                index(v, got[k])

    for key in request:
        if key.startswith("model"):
            index(request[key], loaded[key])
    dict_list_map_inplace(
        lambda v: by_key[tuple(v)].detach().clone().float() if isinstance(v, _FromWeight) else v, loaded_optimizer)


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


def _keeps_step_per_parameter(inner) -> bool:
    """torch's Adam/AdamW keep the step count as a tensor in every parameter's state; Transformer
    Engine's and apex's FusedAdam keep it in the param groups, and their per-parameter state is the
    moments only (TE's state_dict looks up a dtype for each state name: a `step` there is a KeyError)."""
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def _materialize_adam_state(optimizer) -> None:
    """Give a fresh torch Adam zero state to load into: megatron-core's distributed optimizer reads
    its step count from every parameter's state while building the sharded state dict it loads into
    (and asserts when the state is empty); its plain optimizers ask for the count (`common_step`)
    only when there is one. FusedAdam needs nothing: megatron allocates its moments itself."""
    for opt in _sub_optimizers(optimizer):
        inner = opt.optimizer
        if not _keeps_step_per_parameter(inner):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))


def _load_steps_apart(optimizer) -> None:
    """megatron-core's distributed optimizer copies each parameter's state from the checkpoint tensor
    by tensor; the step count comes from the param groups instead, so torch Adam's per-parameter
    `step` has no tensor to copy from, and megatron gives all parameters one shared `step` tensor
    (which Adam would then increment once per parameter). Per optimizer instance, for torch Adam:
    copy everything else, and give each parameter its own copy of the step."""
    for opt in _sub_optimizers(optimizer):
        done = "_set_main_param_and_optimizer_states" in vars(opt)
        if done or not (_is_distributed(opt) and _keeps_step_per_parameter(opt.optimizer)):
            continue
        copy_states = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, opt=opt, copy_states=copy_states):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            state = opt.optimizer.state[opt.optimizer.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None) if "step" not in tensors else None
            try:
                copy_states(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step.clone()

        opt._set_main_param_and_optimizer_states = set_states


def _find_steps(obj, found: list) -> list:
    """Adam's step count wherever an optimizer class keeps it: `common_step` (megatron's plain
    optimizers) or `step` in the param groups (its distributed optimizer)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "common_step" or (k == "step" and "betas" in obj):
                found.append(v)
            else:
                _find_steps(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _find_steps(v, found)
    return found


def _conform(request, loaded, step):
    if isinstance(request, ShardedBase):
        return loaded
    if isinstance(request, LocalNonpersistentObject):  # its value as loaded (_fill_from_weights may set it)
        return request.unwrap() if loaded is None else loaded
    if isinstance(request, dict):
        out = {k: _conform(v, loaded.get(k) if isinstance(loaded, dict) else None, step)
               for k, v in request.items() if k != "common_step"}
        if step is not None and "state" in out and isinstance(out["state"], dict):
            out["state"]["common_step"] = step
        if step is not None and "betas" in out and "step" in out:  # a distributed optimizer's param group
            out["step"] = int(step)
        return out
    if isinstance(request, list):
        return [_conform(v, loaded[i] if isinstance(loaded, list) and i < len(loaded) else None, step)
                for i, v in enumerate(request)]
    return request  # a plain value (param-group hyperparameters): this run's own


def _conform_optimizer_state(request, loaded):
    """Across layouts megatron builds a differently *structured* optimizer (chained expert/dense
    optimizers only when EP > 1, other param groups): keep this run's structure and
    hyperparameters, take the per-parameter tensors loaded by global key, and the step count."""
    steps = _find_steps(loaded, [])
    step = steps[0] if steps else None
    return _conform(request, loaded, step)


def layout_of(dims) -> dict:
    return {"tp": dims.tp, "pp": dims.pp, "cp": dims.cp, "ep": dims.ep, "etp": dims.expert_tp, "dp": dims.dp,
            "vpp": dims.layers_per_virtual_stage, "sp": dims.sequence_parallel}
