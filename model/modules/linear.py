"""A replicated (non-parallel) linear for the local backend: the counterpart of TE's
`TELinear(parallel_mode="duplicated")`, which megatron-core's local provider does not offer."""

from __future__ import annotations

import torch


class DuplicatedLinear(torch.nn.Module):
    """y = x W^T, the same weight on every tensor-parallel rank; returns (output, bias) like
    megatron's parallel linears."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool = False,
                 skip_bias_add: bool = False, **_unused):
        super().__init__()
        if bias:
            raise ValueError("DuplicatedLinear: GLM-5 linears have no bias")
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        if config.perform_initialization:
            init_method(self.weight)

    def forward(self, x: torch.Tensor):
        return torch.nn.functional.linear(x, self.weight), None
