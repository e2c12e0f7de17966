"""megatron-core 0.19.2's selective recompute repaired where Transformer Engine is absent (listed in
parallel/compat/__init__.py).

`tensor_parallel.random.CheckpointWithoutOutput` (selective recompute of layernorm, mlp, moe, shared
experts) sets `self.fp8 = fp8 is not None`, so with fp8=False it still asks TE's
`FP8GlobalStateManager` whether FP8 is on and enters TE's `activation_recompute_forward` and
`fp8_autocast`: names only imported with TE. Without TE the answer is no, and its contexts do
nothing. Keyed on TE's absence (a GPU without TE needs it as much as a CPU); applied by
`parallel.compat.patch_megatron` before any model is built. (0.16.1 also needed MLA's `HAVE_TE` and
the router's `te_general_gemm` repaired; 0.19.2 defines both without TE.)

The same recompute, in 0.19.2, hands the recomputed outputs back by making the discarded output's
storage point at them (`_recompute` calls `_get_share_storage()`), and that function JIT-compiles a
C++ extension with `torch.utils.cpp_extension.load_inline` on first use: a compiler and minutes of
build on a small CI machine, and a wait without end when a process killed mid-build left its lock in
~/.cache/torch_extensions. `share_storage_without_jit` keeps upstream's extension for CUDA tensors
and, for tensors elsewhere (the CPU runtime), refills the discarded storage with a copy: the same
bytes under the same views, without the build.
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


def share_storage_without_jit() -> None:
    """Route `tensor_parallel.random._get_share_storage` (0.19.2) around its C++ build for non-CUDA
    tensors; idempotent."""
    import megatron.core.tensor_parallel.random as mc_random

    upstream = mc_random._get_share_storage
    if getattr(upstream, "_without_jit", False):
        return

    def share_storage(dst, src):
        if dst.is_cuda:
            return upstream()(dst, src)
        # discard_output resized dst's storage to 0; give it src's bytes back, views and all
        storage = dst.untyped_storage()
        storage.resize_(src.untyped_storage().nbytes())
        storage.copy_(src.untyped_storage())

    def get_share_storage():
        return share_storage

    get_share_storage._without_jit = True
    mc_random._get_share_storage = get_share_storage


class _NoFP8:
    """TE's FP8GlobalStateManager as megatron's recompute asks it, without TE: FP8 is off."""

    @staticmethod
    def is_fp8_enabled() -> bool:
        return False

    @staticmethod
    def get_fp8_recipe():
        return None
