"""The expert-load picture: one row per layer (global index, the MTP layer last), one column per
expert, each cell that expert's tokens / the layer's mean tokens per expert in the last step.

A diverging colour scale on log2 of the load: white is balanced (1x), red overloaded, blue starved,
saturating at 4x and 1/4x (`LOG2_RANGE`); layers without experts (dense) are black. Cells are
drawn as squares of `cell` pixels, so the picture is about 512 pixels on its longer side.
numpy only (no plotting library).
"""

from __future__ import annotations

import numpy as np

LOG2_RANGE = 2.0  # the colours span 2**-2 .. 2**2 times the mean load
NO_EXPERTS = (0, 0, 0)
_BLUE, _WHITE, _RED = np.array([59, 76, 192.0]), np.array([221, 221, 221.0]), np.array([180, 4, 38.0])


def _lut() -> np.ndarray:
    t = np.linspace(0.0, 1.0, 256)[:, None]
    low = _BLUE + (_WHITE - _BLUE) * np.clip(t / 0.5, 0, 1)
    high = _WHITE + (_RED - _WHITE) * np.clip((t - 0.5) / 0.5, 0, 1)
    return np.rint(np.where(t < 0.5, low, high)).astype(np.uint8)


LUT = _lut()  # 256 x RGB: index 0 is 2**-LOG2_RANGE, 255 is 2**LOG2_RANGE, 127.5 is 1


def load_index(load: np.ndarray) -> np.ndarray:
    """The colour index of each load (a multiple of the mean)."""
    v = np.clip(np.log2(np.maximum(load, 2.0 ** -LOG2_RANGE)), -LOG2_RANGE, LOG2_RANGE)
    return np.rint((v + LOG2_RANGE) / (2 * LOG2_RANGE) * 255).astype(np.int64)


def render(load: np.ndarray, longer_side: int = 512) -> tuple[np.ndarray, int]:
    """(H x W x 3 uint8 image, cell size in pixels) of a layers x experts load matrix; rows of NaN
    (no experts) are black."""
    rows, cols = load.shape
    dense = np.isnan(load).all(axis=1)
    image = LUT[load_index(np.nan_to_num(load, nan=1.0))]
    image[dense] = NO_EXPERTS
    cell = max(1, longer_side // max(rows, cols))
    return np.repeat(np.repeat(image, cell, axis=0), cell, axis=1), cell
