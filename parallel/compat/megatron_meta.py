"""megatron-core's GPU allocations sent to the meta device, for tools/simulate_layout.py (listed in
parallel/compat/__init__.py): a rank of a large layout built on one CPU, tensors without storage."""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

META = torch.device("meta")


def _is_cuda(device) -> bool:
    if isinstance(device, bool):
        return False
    return (isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda"))
            or (isinstance(device, torch.device) and device.type == "cuda"))


class MetaDevice(TorchFunctionMode):
    """Everything megatron-core puts on "the GPU" goes to the meta device instead.

    Sits above parallel/compat/megatron_cpu.py's redirection: CUDA device arguments (megatron asks
    torch.cuda.current_device() for its buffers) become "meta", tensors created without a device
    are meta (torch.device("meta") in `on_meta`), and meta tensors answer `.type()` with the CUDA
    name megatron's optimizers check for. Explicit CPU tensors (object collectives) stay real."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].is_meta:
            return "torch.cuda." + func(*args).rsplit(".", 1)[-1]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = META
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], META, *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta():
    """Within: megatron's tensors on the meta device; `torch.cuda.current_device` answers a CUDA
    ordinal (megatron's buffers ask it for their device), restored on exit."""
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0  # a CUDA ordinal, mapped to meta by MetaDevice
    try:
        with torch.device(META), MetaDevice():
            yield
    finally:
        torch.cuda.current_device = current_device
