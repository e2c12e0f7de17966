"""megatron-core's CUDA assumptions redirected to the CPU -- the ONE place that does so (listed in
parallel/compat/__init__.py).

megatron-core 0.19.2 assumes CUDA in about a dozen places: `device="cuda"` and `.cuda()` in the
schedules, optimizer, grad clipping, MoE trackers and dist-checkpointing; `torch.cuda.FloatTensor`
type checks in the optimizers; `torch.cuda.current_device()` for buffers; CUDA streams in the
all-to-all token dispatcher; the CUDA RNG tracker. On a machine without CUDA, `activate()`:

1. enters a TorchFunctionMode that turns every CUDA device argument into "cpu", makes
   `Tensor.cuda()` a no-op and answers `Tensor.type()` with the CUDA name of the CPU type;
2. makes the all-to-all dispatcher's split sizes plain arrays (it converts them only when they
   are CUDA tensors, and gloo's all_to_all_single refuses tensors there);
3. replaces the few `torch.cuda` functions megatron calls (current_device, streams, events,
   synchronize, memory stats, RNG state) with CPU equivalents.

It is a debugging/CI runtime, not a production path: with CUDA present `activate()` does nothing,
so nothing here can change what runs on a GPU. (Transformer Engine's absence is a separate matter,
repaired wherever it is absent, GPU or not: parallel/compat/megatron_without_te.py.)
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False


def _to_cpu(device):
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu(args[1]), *args[2:])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _DummyStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record_event(self, *args):
        return _DummyEvent()

    def synchronize(self):
        pass


class _DummyEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args):
        pass

    def wait(self, *args):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _fix_dispatcher_splits() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def activate() -> bool:
    """Install the redirections if there is no CUDA; returns whether they are active."""
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _DummyStream
    cuda.Event = _DummyEvent
    cuda.current_stream = lambda *a, **k: _DummyStream()
    cuda.default_stream = lambda *a, **k: _DummyStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    # The CUDA RNG tracker forks and restores "CUDA" RNG state: give it the CPU generator's.
    import megatron.core.tensor_parallel.random as mc_random

    cuda.get_rng_state = cuda.random.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = cuda.random.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mc_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mc_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _fix_dispatcher_splits()
    _CudaToCpu().__enter__()  # for the life of the process
    _ACTIVE = True
    return True
