"""A single-process gloo group with megatron's parallel state, for in-process model tests."""

import pytest

from tests.helpers import one_rank_gloo_world


@pytest.fixture(scope="module")
def single_process_group():
    from megatron.core import parallel_state, tensor_parallel

    with one_rank_gloo_world():
        parallel_state.initialize_model_parallel()
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        yield
        parallel_state.destroy_model_parallel()
