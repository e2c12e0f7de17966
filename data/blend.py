"""Blending datasets by weight: Megatron's `--data-path` syntax and the row -> dataset schedule.

Every global batch row (global index g = step * global_batch_size + row) is drawn whole from one dataset,
chosen by a seeded Weyl sequence: u_g = (g * 2^64/phi + offset) mod 2^64, dataset = the weight bucket u_g
falls in. It is a pure function of (weights, seed, g), so it needs no state to resume and any rank can
compute any row; and being low-discrepancy, the rows of dataset d among any n consecutive rows differ from
n * w_d by O(log n), not O(sqrt n) as with random draws (Megatron gets the same from a greedy sequential
index, which must be stored or replayed).
"""

from __future__ import annotations

import math

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, odd
_BLEND_TAG = 0xB1E4D


def parse_data_path(data_path: list[str]) -> tuple[list[float] | None, list[str]]:
    """Megatron syntax -> (weights or None, manifest paths).

    ["a/manifest.json"] -> ([1.0], [a]); ["0.7", "a", "0.3", "b"] -> ([0.7, 0.3], [a, b]);
    ["a", "b"] (no weights) -> (None, [a, b]): the caller weighs them by size, as Megatron does.
    """
    if isinstance(data_path, str):
        data_path = [data_path]
    if not data_path:
        raise ValueError("--data-path is empty: give a manifest.json, or weight/manifest pairs")
    if len(data_path) == 1:
        return [1.0], list(data_path)

    def number(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:
            return None

    if all(number(s) is None for s in data_path):
        return None, list(data_path)
    if len(data_path) % 2 or any(number(s) is None for s in data_path[::2]):
        raise ValueError(f"--data-path {' '.join(data_path)!r}: expected 'WEIGHT PATH WEIGHT PATH ...' "
                         "or only paths")
    weights = [float(w) for w in data_path[::2]]
    for w, path in zip(weights, data_path[1::2]):
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"--data-path: weight {w} of {path} must be a positive number")
    return weights, list(data_path[1::2])


class BlendSchedule:
    """Which dataset each global row comes from."""

    def __init__(self, weights: list[float], seed: int):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or (w <= 0).any():
            raise ValueError(f"blend weights {weights} must be positive numbers")
        self.weights = w / w.sum()
        cumulative = np.cumsum(self.weights)[:-1]
        self._edges = np.array([min(int(c * 2.0 ** 64), 2 ** 64 - 1) for c in cumulative], dtype=np.uint64)
        self._offset = np.random.SeedSequence([seed, _BLEND_TAG]).generate_state(1, np.uint64)[0]

    def choose(self, rows: np.ndarray) -> np.ndarray:
        """Dataset index (int64) for each global row index."""
        if self.weights.size == 1:
            return np.zeros(len(rows), np.int64)
        u = np.asarray(rows, dtype=np.uint64) * _GOLDEN + self._offset  # wraps mod 2^64 by design
        return np.searchsorted(self._edges, u, side="right").astype(np.int64)
