"""parallel/runtime.py's agreement helpers: the value, the reduction and the group each caller names reach
the all-reduce, on the device it names (NCCL takes no host tensor). Agreement across two ranks is
proven by tests/launch/test_slurm.py (a signal to one rank stops both) and the reliability tests."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel import runtime as rt
from tests.helpers import free_port, one_rank_gloo_world


@pytest.fixture
def reductions(monkeypatch):
    """(device, op, group) of each all-reduce the helpers make, the reduction itself still done."""
    seen, real = [], dist.all_reduce

    def spy(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        seen.append((tensor.device, tensor.dtype, op, group))
        return real(tensor, op=op, group=group, async_op=async_op)

    monkeypatch.setattr(dist, "all_reduce", spy)
    return seen


def test_each_helper_reduces_with_its_op_on_the_named_device_and_group(reductions):
    cpu = torch.device("cpu")
    with one_rank_gloo_world():
        group = dist.new_group([0])
        assert rt.agree(15, dist.ReduceOp.MAX, cpu, group) == 15  # a signal number comes back whole
        assert rt.every_rank(True, cpu) is True and rt.every_rank(False, cpu) is False
        assert rt.any_rank(True, cpu, group) is True and rt.any_rank(False, cpu) is False
    assert reductions == [(cpu, torch.int64, dist.ReduceOp.MAX, group),
                          (cpu, torch.int64, dist.ReduceOp.MIN, None), (cpu, torch.int64, dist.ReduceOp.MIN, None),
                          (cpu, torch.int64, dist.ReduceOp.MAX, group), (cpu, torch.int64, dist.ReduceOp.MAX, None)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_helpers_run_over_nccl_on_the_gpu(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    try:
        assert rt.agree(10, dist.ReduceOp.MAX, device) == 10
        assert rt.every_rank(True, device) and rt.any_rank(True, device) and not rt.any_rank(False, device)
    finally:
        dist.destroy_process_group()
