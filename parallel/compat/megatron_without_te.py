"""megatron-core 0.19.2's selective recompute repaired where Transformer Engine is absent (listed in
parallel/compat/__init__.py).

`tensor_parallel.random.CheckpointWithoutOutput` (selective recompute of layernorm, mlp, moe, shared
experts) sets `self.fp8 = fp8 is not None`, so with fp8=False it still asks TE's
`FP8GlobalStateManager` whether FP8 is on and enters TE's `activation_recompute_forward` and
`fp8_autocast`: names only imported with TE. Without TE the answer is no, and its contexts do
nothing. Keyed on TE's absence (a GPU without TE needs it as much as a CPU); applied by
`parallel.compat.patch_megatron` before any model is built. (0.16.1 also needed MLA's `HAVE_TE` and
the router's `te_general_gemm` repaired; 0.19.2 defines both without TE.)
"""

from __future__ import annotations

import contextlib


def repair_te_stand_ins(te_present: bool) -> bool:
    """Tell megatron-core's recompute that TE is absent, when it is. Returns whether it repaired."""
    if te_present:
        return False
    import megatron.core.tensor_parallel.random as mc_random

    mc_random.FP8GlobalStateManager = _NoFP8
    mc_random.activation_recompute_forward = lambda *a, **k: contextlib.nullcontext()
    mc_random.fp8_autocast = lambda *a, **k: contextlib.nullcontext()
    return True


class _NoFP8:
    """TE's FP8GlobalStateManager as megatron's recompute asks it, without TE: FP8 is off."""

    @staticmethod
    def is_fp8_enabled() -> bool:
        return False

    @staticmethod
    def get_fp8_recipe():
        return None
