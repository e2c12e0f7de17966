"""GLM-5.3-Flash's own parameters initialised as transformers' `Glm5NextPreTrainedModel._init_weights` does,
after model/initialization.py's layout-invariant draw (which fills every 1-D tensor with 1 -- a norm's -- and
every matrix from N(0, init_method_std)). Each value is drawn from that module's generator seeded by the run's
seed and the parameter's global name, so every layout draws the same model.

- KDA forget gate (following flash-linear-attention): `A_log` 0 with the gate's lower bound (else log U(1, 16));
  `dt_bias` the inverse softplus of dt ~ exp(U(log 1e-3, log 1e-1)). transformers' comment: "incredibly important".
- mHC: `weight` N(0, 0.02), `bias` 0, `scale` 1.
- pooled indexer: the pool's position bias 0 and its gate 1 (a plain mean of each pool's keys at first).
"""

from __future__ import annotations

import math

import torch

from model.modules.hyper_connection import HyperConnection
from model.modules.kda import KimiDeltaAttention
from model.modules.pooled_indexer import PooledKeyIndexer


@torch.no_grad()
def init_flash_modules(chunk, seed: int, global_name) -> None:
    """`global_name(local_name, chunk)`: model/initialization.py's name of a parameter in every layout."""
    from model.initialization import _generator

    names = {id(p): n for n, p in chunk.named_parameters()}
    for module in chunk.modules():
        if isinstance(module, KimiDeltaAttention):
            g = _generator(seed, global_name(names[id(module.dt_bias)], chunk))
            if module.lower_bound is not None:
                module.A_log.zero_()
            else:
                module.A_log.copy_(torch.empty(module.A_log.shape).uniform_(1.0, 16.0, generator=g).log())
            dt = torch.empty(module.dt_bias.shape).uniform_(math.log(1e-3), math.log(1e-1), generator=g).exp()
            dt = dt.clamp_min(1e-4)
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif isinstance(module, HyperConnection):
            g = _generator(seed, global_name(names[id(module.weight)], chunk))
            module.weight.copy_(torch.normal(0.0, 0.02, module.weight.shape, generator=g))
            module.bias.zero_()
            module.scale.fill_(1.0)
        elif isinstance(module, PooledKeyIndexer):
            module.kpool_position_bias.zero_()
            module.kpool_gate.fill_(1.0)
