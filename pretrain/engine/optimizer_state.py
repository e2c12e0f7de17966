"""megatron-core optimizer state across checkpoint layouts: what a checkpoint saved by one optimizer
layout needs to load into another (used by the megatron engine, pretrain/engine/megatron.py).

- Any TP/PP/EP/DP change: megatron builds a differently *structured* optimizer (chained expert/dense
  optimizers only when EP > 1, other param groups); keep this run's structure and hyperparameters,
  take the per-parameter tensors loaded by global key, and the step count (`conform`).
- Saved without --use-distributed-optimizer, loaded with it: the fp32 main parameters come from the
  plain optimizer's fp32 copies (bf16 training) or from the fp32 weights themselves
  (`main_params_from_plain_checkpoint`, then `fill_from_weights`).
- A fresh torch Adam has no state to load into (`materialize_adam_state`).
- Muon (--optimizer muon): megatron-core chains one Muon and one Adam optimizer per kind of parameter, whose
  param groups differ from layout to layout (which groups a rank has), so the saved groups (common state,
  merged by position on load) cannot be merged into this run's: they are left out of the load request
  (`take_param_groups`) and this run's own are put back for `conform` (`put_param_groups`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

_MAIN_PARAM = "optimizer.state.param."  # the distributed optimizer's fp32 main parameters


def sub_optimizers(optimizer) -> list:
    return getattr(optimizer, "chained_optimizers", [optimizer])


def is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(sub_optimizers(optimizer)[0], DistributedOptimizer)


def keeps_step_per_parameter(inner) -> bool:
    """torch's Adam/AdamW keep the step count as a tensor in every parameter's state; Transformer
    Engine's and apex's FusedAdam keep it in the param groups, and their per-parameter state is the
    moments only (TE's state_dict looks up a dtype for each state name: a `step` there is a KeyError)."""
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def materialize_adam_state(optimizer) -> None:
    """Give a fresh torch Adam zero state to load into: megatron-core's distributed optimizer reads
    its step count from every parameter's state while building the sharded state dict it loads into
    (and asserts when the state is empty); its plain optimizers ask for the count (`common_step`)
    only when there is one. FusedAdam needs nothing: megatron allocates its moments itself."""
    for opt in sub_optimizers(optimizer):
        inner = opt.optimizer
        if not keeps_step_per_parameter(inner):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))


def take_param_groups(request) -> list[tuple[dict, object]]:
    """Remove every `param_groups` entry from a load request; returns them for `put_param_groups`."""
    taken = []

    def walk(obj):
        if isinstance(obj, dict):
            if "param_groups" in obj:
                taken.append((obj, obj.pop("param_groups")))
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(request)
    return taken


def put_param_groups(taken: list[tuple[dict, object]]) -> None:
    for container, groups in taken:
        container["param_groups"] = groups


class _FromWeight(tuple):
    """Placeholder in a load request: fill with the loaded model weight of this (checkpoint key,
    global offset): the local experts of a layer share one key, at different offsets."""


def main_params_from_plain_checkpoint(request, directory: Path) -> None:
    """Point the distributed optimizer's main-parameter requests at what a plain optimizer saved:
    `optimizer.state.fp32_param.X` (bf16 training), or, in fp32 training, the weight `X` itself,
    which the model part of the same load already reads (a key may be loaded once: a placeholder
    here, filled by `fill_from_weights`)."""
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


def fill_from_weights(loaded_optimizer, model_request: dict, loaded_model: dict) -> None:
    """Replace the placeholders of `main_params_from_plain_checkpoint` with the loaded weights."""
    by_key = {}

    def index(req, got):
        if isinstance(req, ShardedBase):
            by_key[(req.key, _offset(req))] = got
        elif isinstance(req, dict):
            for k, v in req.items():
                index(v, got[k])

    index(model_request, loaded_model)
    dict_list_map_inplace(
        lambda v: by_key[tuple(v)].detach().clone().float() if isinstance(v, _FromWeight) else v, loaded_optimizer)


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
    if isinstance(request, LocalNonpersistentObject):  # its value as loaded (fill_from_weights may set it)
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


def conform(request, loaded):
    """The optimizer state as loaded, in the structure this run's optimizer asked for (see the module doc)."""
    steps = _find_steps(loaded, [])
    return _conform(request, loaded, steps[0] if steps else None)
