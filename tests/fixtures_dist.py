"""A single-process gloo group with megatron's parallel state, for in-process model tests."""

import pytest
import torch.distributed as dist

from tests.helpers import free_port


@pytest.fixture(scope="module")
def single_process_group():
    import os

    from megatron.core import parallel_state, tensor_parallel

    from parallel import cpu_runtime

    cpu_runtime.activate()
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
