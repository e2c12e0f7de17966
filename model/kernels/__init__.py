"""Triton kernels for DSA (CUDA): the sparse MLA attention forward/backward and the indexer's
score tiles. The torch blockwise path (model/modules/dsa_blockwise.py) is their reference and runs
wherever they cannot: `triton_usable` keys on what is present (a CUDA tensor, an importable Triton).
tests/model/dsa/test_dsa_kernels.py also runs them on CPU tensors under TRITON_INTERPRET=1 (`interpreted`:
fp32 dots there).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(device: torch.device) -> bool:
    """Whether the DSA layer should run the kernels on tensors of `device` (compiled, on CUDA)."""
    return device.type == "cuda" and triton_importable()


def sparse_mla_triton(q, kv, idx, scale: float, dv: int):
    from model.kernels.sparse_mla import sparse_mla

    return sparse_mla(q, kv, idx, scale, dv)


def indexer_scores_triton(q, w, k, q_pos, k_start: int, q_start=None):
    from model.kernels.indexer import indexer_scores

    return indexer_scores(q, w, k, q_pos, k_start, q_start)
