"""Device runtime: CUDA + NCCL when there is a GPU, CPU + gloo otherwise; megatron's groups.

The only module that picks the device and the collective backend. On CPU it activates
parallel/compat/megatron_cpu.py (inert when CUDA is present).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.compat import megatron_cpu
from parallel.dims import ParallelDims


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    local_rank: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(timeout_s: float = 600.0) -> Runtime:
    """Start torch.distributed from torchrun's environment (or as a single process)."""
    cuda = torch.cuda.is_available()
    if not cuda:
        megatron_cpu.activate()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a single process without torchrun: any free port, as
        os.environ["MASTER_PORT"] = str(_free_port())  # several single-process tools may run at once
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return Runtime(device=device, rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def agree(value: int | bool, op: dist.ReduceOp, device: torch.device, group=None) -> int:
    """The one value every rank of `group` (default: the world) takes: `op` (MIN: the lowest, MAX: the
    highest) over each rank's integer `value`. A collective; `device` is the runtime's (NCCL takes no
    host tensor), CPU for gloo."""
    flag = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=op, group=group)
    return int(flag.item())


def every_rank(ok: bool, device: torch.device, group=None) -> bool:
    """True on every rank when `ok` is true on every rank (a collective)."""
    return bool(agree(ok, dist.ReduceOp.MIN, device, group))


def any_rank(flag: bool, device: torch.device, group=None) -> bool:
    """True on every rank when `flag` is true on any rank (a collective)."""
    return bool(agree(flag, dist.ReduceOp.MAX, device, group))


def init_model_parallel(dims: ParallelDims, num_layers: int, seed: int, timeout_s: float = 600.0,
                        gloo_groups: bool = True) -> None:
    """megatron-core's groups for `dims`; `gloo_groups=False` under a fake process group (no gloo there)."""
    from megatron.core import parallel_state, tensor_parallel

    from parallel.compat import patch_megatron

    patch_megatron()  # before any model is built (parallel/compat/__init__.py)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=dims.vpp(num_layers),
        context_parallel_size=dims.cp,
        expert_model_parallel_size=dims.ep,
        expert_tensor_parallel_size=dims.expert_tp,
        distributed_timeout_minutes=timeout_s / 60,  # a timedelta inside: fractions work
        create_gloo_process_groups=gloo_groups,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
