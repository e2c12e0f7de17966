"""Test-only check: would every tensor our code hands to a collective be on the GPU?

On a GPU run the default process group (and every megatron group but its gloo ones) is NCCL, which
refuses CPU tensors: a flag made with `torch.ones(1)` and all-reduced kills the first GPU step. On
the CPU test bench everything is a CPU tensor and gloo takes it, so the bug is invisible. This module
makes it visible: it follows, for every tensor, where it *would* live on a GPU and fails the
collectives that would get a host tensor.

- A tensor is "host" when our code (pretrain/, data/, model/, parallel/, tools/, launch/) makes it
  without a device (`torch.ones(1)`, `torch.tensor([...])`, `torch.zeros(n)`), with `device="cpu"`
  spelled as a string, or with `.cpu()` / `.to("cpu")`; and when an op computes it from host
  tensors only (`torch.stack([mask.sum() ...])` of a host mask). `.to(device)` / `.cuda()` to any
  other device makes it a device tensor again. An explicit `device=` object (the runtime's) is
  trusted; tensors megatron-core makes are its business (it is written for CUDA).
- Every torch.distributed collective checks its tensors, unless it runs over a group created with
  `backend="gloo"` (megatron's gloo groups: CPU on purpose).

Used by `tests/collective_devices_site/sitecustomize.py` in worker processes started with
`GLM5_CHECK_COLLECTIVE_DEVICES=1` and that folder on PYTHONPATH (`env()` below); each worker prints
`collective device check: rank R checked N collectives, V host tensors` when it exits, and one line
per violation to stderr.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import re
import sys
import threading
from pathlib import Path

ENV = "GLM5_CHECK_COLLECTIVE_DEVICES"
ROOT = Path(__file__).resolve().parents[1]
SITE = Path(__file__).resolve().parent / "collective_devices_site"
OURS = tuple(str(ROOT / d) + os.sep for d in ("pretrain", "data", "model", "parallel", "tools", "launch"))
TAG = "_glm5_host_origin"  # attribute on a tensor: where our code made it on the host
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
               "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "all_to_all",
               "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv", "batch_isend_irecv")
SUMMARY = "collective device check:"

_checked = 0
_violations: list[str] = []
_gloo_groups: list = []
_inside = threading.local()  # a wrapped collective reaches torch's own through the function modes


def env() -> dict:
    """Environment for a child process that runs under the check (merge into tests.helpers.child_env())."""
    from tests.helpers import child_env

    base = child_env()
    return {ENV: "1", "PYTHONPATH": str(SITE) + os.pathsep + base["PYTHONPATH"]}


def _our_caller() -> str | None:
    """'file:line' of the first frame outside torch and this module, when it is our code."""
    import torch

    torch_dir = os.path.dirname(torch.__file__)
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(torch_dir) and name != __file__:
            return f"{os.path.relpath(name, ROOT)}:{frame.f_lineno}" if name.startswith(OURS) else None
        frame = frame.f_back
    return None


def _tensors(values):
    import torch

    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (x for x in v if isinstance(x, torch.Tensor))


def _is_cpu_string(device) -> bool:
    return isinstance(device, str) and device.split(":")[0] == "cpu"


def _target_device(args, kwargs):
    """The device of a `.to(...)` call, or None when it names none (a dtype, or another tensor)."""
    import torch

    for v in (*args, kwargs.get("device")):
        if isinstance(v, (str, torch.device, int)) and not isinstance(v, bool):
            return v
    return None


def _mark(tensor, origin: str | None) -> None:
    try:
        if origin is None:
            if hasattr(tensor, TAG):
                delattr(tensor, TAG)
        else:
            setattr(tensor, TAG, origin)
    except (AttributeError, TypeError, RuntimeError):
        pass


def _tracker_mode():
    import torch
    from torch.overrides import TorchFunctionMode

    to_host = {torch.Tensor.cpu}
    to_device = {torch.Tensor.cuda}

    class HostTensorTracker(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if torch.compiler.is_compiling():  # inside a compiled region: nothing to follow
                return out
            outputs = [out] if isinstance(out, torch.Tensor) else list(_tensors(out if isinstance(out, (list, tuple))
                                                                                  else ()))
            if not outputs:
                return out
            inputs = list(_tensors(args)) + list(_tensors(kwargs.values()))
            if func in to_host:
                origin = _our_caller()
            elif func in to_device:
                origin = None
            elif func is torch.Tensor.to and _target_device(args[1:], kwargs) is not None:
                target = _target_device(args[1:], kwargs)
                origin = _our_caller() if _is_cpu_string(target) else None
            elif kwargs.get("device") is not None:
                origin = _our_caller() if _is_cpu_string(kwargs["device"]) else None
            elif not inputs:  # a factory without a device: the host
                origin = _our_caller()
            else:
                tags = [getattr(t, TAG, None) for t in inputs]
                origin = tags[0] if all(tags) else None
                ids = {id(t) for t in inputs}
                outputs = [o for o in outputs if id(o) not in ids]  # in place: the tensor stays where it is
            for o in outputs:
                _mark(o, origin)
            return out

    return HostTensorTracker()


def _check(name: str, fn):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        if getattr(_inside, "active", False):
            return fn(*args, **kwargs)
        _inside.active = True
        try:
            _check_call(name, signature, args, kwargs)
            return fn(*args, **kwargs)
        finally:
            _inside.active = False

    return checked


def _check_call(name, signature, args, kwargs) -> None:
    global _checked
    try:
        bound = signature.bind(*args, **kwargs).arguments
    except TypeError:
        return
    pairs = []  # (tensor, group)
    if name == "batch_isend_irecv":
        pairs = [(op.tensor, op.group) for op in bound.get("p2p_op_list", [])]
    else:
        values = [v for k, v in bound.items() if k != "group"]
        pairs = [(t, bound.get("group")) for t in _tensors(values)]
    _checked += 1
    for tensor, group in pairs:
        if any(group is g for g in _gloo_groups):
            continue
        origin = getattr(tensor, TAG, None)
        if origin:
            caller = _our_caller() or "megatron-core/torch"
            line = (f"{SUMMARY} VIOLATION {name} from {caller}: a tensor made on the host at {origin} "
                    "(NCCL refuses CPU tensors)")
            _violations.append(line)
            sys.stderr.write(line + "\n")  # one write: ranks share the pipe
            sys.stderr.flush()


def install() -> None:
    """Wrap the collectives now; start following tensors when the process group starts (after
    parallel.compat.megatron_cpu has entered its own mode, so this one sees the device arguments first)."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for name in COLLECTIVES:
        fn = getattr(c10d, name, None)
        if fn is not None:
            wrapped = _check(name, fn)
            setattr(c10d, name, wrapped)
            if getattr(dist, name, None) is fn:
                setattr(dist, name, wrapped)

    new_group = c10d.new_group

    @functools.wraps(new_group)
    def recording_new_group(*args, **kwargs):
        group = new_group(*args, **kwargs)
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        if backend is not None and str(backend).lower() == "gloo":
            _gloo_groups.append(group)
        return group

    c10d.new_group = dist.new_group = recording_new_group

    init = c10d.init_process_group

    @functools.wraps(init)
    def init_and_track(*args, **kwargs):
        result = init(*args, **kwargs)
        _tracker_mode().__enter__()  # for the life of the process
        return result

    c10d.init_process_group = dist.init_process_group = init_and_track

    def report():
        if dist.is_initialized() or _checked:
            rank = os.environ.get("RANK", "0")
            # one write, so that two ranks sharing a pipe cannot splice their lines together
            sys.stdout.write(f"{SUMMARY} rank {rank} checked {_checked} collectives, "
                             f"{len(_violations)} host tensors\n")
            sys.stdout.flush()

    atexit.register(report)


def violations(output: str) -> list[str]:
    return sorted(set(re.findall(r" VIOLATION (.*?\(NCCL refuses CPU tensors\))", output)))


def checked_counts(output: str) -> list[int]:
    """One count per rank that reported, found anywhere in the output (lines of ranks may interleave)."""
    return [int(n) for n in re.findall(re.escape(SUMMARY) + r" rank \d+ checked (\d+) collectives", output)]
