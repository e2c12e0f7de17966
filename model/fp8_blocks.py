"""128x128 block-scaled FP8 (E4M3) weights, the format of GLM-5-FP8 / DeepSeek-V3 releases.

A 2-D weight [rows, cols] is cut into blocks of `block` x `block` (the last row/column of blocks
may be smaller: the scale grid is ceil(rows/128) x ceil(cols/128), as the releases store it).
Each block gets one fp32 scale s = amax(block) / 448 (448 = largest finite E4M3), the stored
weight is round_to_e4m3(w / s), and `weight_scale_inv` holds s itself, so dequantizing is
`w_fp8 * weight_scale_inv` per block (the name is DeepSeek's: the inverse of the quantizing scale).
E4M3 keeps 3 mantissa bits: every element is within 2^-4 * amax(block) of its source.
"""

from __future__ import annotations

import torch

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0


def scale_shape(shape: tuple[int, int] | torch.Size, block: int = BLOCK) -> tuple[int, int]:
    rows, cols = shape
    return -(-rows // block), -(-cols // block)


def _blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    """[rows, cols] -> [R, block, C, block] view of the blocks (zero-padded only when ragged)."""
    rows, cols = t.shape
    r, c = scale_shape(t.shape, block)
    if rows % block or cols % block:
        t = torch.nn.functional.pad(t, (0, c * block - cols, 0, r * block - rows))
    return t.reshape(r, block, c, block)


def _unblock(b: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    t = b.view(b.shape[0] * b.shape[1], b.shape[2] * b.shape[3])
    return t if t.shape == (rows, cols) else t[:rows, :cols].contiguous()


def quantize(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [rows, cols] (any float dtype) -> (float8_e4m3fn [rows, cols], fp32 scale_inv [R, C])."""
    if w.dim() != 2:
        raise ValueError(f"fp8 block quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    b = _blocks(w.float(), block)
    amax = torch.maximum(b.amax(dim=(1, 3)), -b.amin(dim=(1, 3)))  # no |w| temporary
    # An all-zero block gets scale 1 (any value works; 1 keeps the dequantized zeros exact).
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (b / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return _unblock(q, *w.shape), scale


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(float8 [rows, cols], scale_inv [R, C]) -> dtype [rows, cols]."""
    if tuple(scale_inv.shape) != scale_shape(q.shape, block):
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(q.shape)} "
                         f"in {block}x{block} blocks (expected {scale_shape(q.shape, block)})")
    w = _blocks(q.float(), block) * scale_inv.float()[:, None, :, None]
    return _unblock(w, *q.shape).to(dtype)
