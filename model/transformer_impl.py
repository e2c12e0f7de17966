"""Which transformer implementation builds the model -- Transformer Engine or megatron-core's local
modules (Megatron-LM's `--transformer-impl`) -- and what megatron-core 0.16.1 needs when TE is absent.

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
import functools

import torch

IMPLS = ("local", "transformer_engine")


@functools.cache
def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
        return True
    except (ImportError, OSError):  # OSError: installed, but its CUDA libraries do not load
        return False


def resolve(requested: str | None, *, cuda: bool | None = None, te: bool | None = None) -> str:
    """The implementation to use for `--transformer-impl requested` (None: TE when it can run)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    te = te_available() if te is None else te
    if requested is None:
        return "transformer_engine" if cuda and te else "local"
    if requested not in IMPLS:
        raise ValueError(f"--transformer-impl {requested!r}: choose one of {', '.join(IMPLS)}")
    if requested == "transformer_engine" and not (cuda and te):
        raise ValueError("--transformer-impl transformer_engine needs a GPU with Transformer Engine; "
                         + ("Transformer Engine is not installed (pip install -e .[gpu])" if cuda
                            else "no GPU is present") + ": use --transformer-impl local")
    return requested


def repair_te_stand_ins(te_present: bool | None = None) -> bool:
    """Tell megatron-core's MLA and router that TE is absent, when it is. Returns whether it repaired."""
    if te_present is None:
        te_present = te_available()
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
