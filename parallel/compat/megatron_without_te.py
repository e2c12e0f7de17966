"""megatron-core 0.16.1's local path repaired where Transformer Engine is absent (listed in
parallel/compat/__init__.py).

Without TE, megatron-core replaces TE's names by stand-ins that break its own local path:
`megatron.core.extensions.transformer_engine` makes `TELinear` a MagicMock while
`multi_latent_attention` still believes TE is there (`HAVE_TE = True`), so MLA's
`isinstance(self.linear_proj, TELinear)` raises; the fp32 router's gating
(`moe_utils.RouterGatingLinearFunction`) calls `te_general_gemm`, which is then never defined; and
`tensor_parallel.CheckpointWithoutOutput` (selective recompute of layernorm, mlp, moe, shared
experts) always asks TE's `FP8GlobalStateManager` whether FP8 is on (`fp8 = fp8 is not None` with
fp8=False), a name only imported with TE: without TE the answer is no, and its contexts do nothing.
The repair keys on TE's absence -- a GPU without TE needs it as much as a CPU -- and is applied
by model/specs.py before any layer is built.
"""

from __future__ import annotations

import contextlib


def repair_te_stand_ins(te_present: bool) -> bool:
    """Tell megatron-core's MLA, router and recompute that TE is absent, when it is. Returns whether
    it repaired."""
    if te_present:
        return False
    import megatron.core.tensor_parallel.random as mc_random
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.multi_latent_attention as mla

    mla.HAVE_TE = False
    moe_utils.te_general_gemm = None  # referenced but never defined without TE
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
