"""Which transformer implementation builds the model -- Transformer Engine or megatron-core's local
modules (Megatron-LM's `--transformer-impl`). What megatron-core's local path needs when TE is absent
is a patch: parallel/compat/megatron_without_te.py.
"""

from __future__ import annotations

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

