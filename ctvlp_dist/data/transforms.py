"""Volume transforms on numpy (D, H, W) arrays, driven by a per-sample RNG so that
augmentation is reproducible by (seed, epoch, position) whatever the worker count.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def hu_window(vol: np.ndarray, window, out_range) -> np.ndarray:
    """Clip to the HU window and map it linearly onto out_range (seed paper: [-1000,200] -> [-1,1])."""
    lo, hi = float(window[0]), float(window[1])
    a, b = float(out_range[0]), float(out_range[1])
    v = np.clip(vol.astype(np.float32), lo, hi)
    return (v - lo) * np.float32((b - a) / (hi - lo)) + np.float32(a)


def _pad_to(vol: np.ndarray, shape, value) -> np.ndarray:
    pads = [((max(0, m - n)) // 2, max(0, m - n) - (max(0, m - n)) // 2) for n, m in zip(vol.shape, shape)]
    if not any(p for pair in pads for p in pair):
        return vol
    return np.pad(vol, pads, mode="constant", constant_values=value)


def crop_pair(vol: np.ndarray, mask: Optional[np.ndarray], size, rng: Optional[np.random.Generator],
              pad_value) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Random crop (rng given) or centre crop (rng None) to `size`, padding smaller axes."""
    vol = _pad_to(vol, size, pad_value)
    if mask is not None:
        mask = _pad_to(mask, size, 0)
    starts = []
    for n, m in zip(vol.shape, size):
        starts.append(int(rng.integers(0, n - m + 1)) if rng is not None else (n - m) // 2)
    sl = tuple(slice(s, s + m) for s, m in zip(starts, size))
    return vol[sl], (mask[sl] if mask is not None else None)


def random_flip(vol: np.ndarray, mask: Optional[np.ndarray], axes, prob: float, rng: np.random.Generator):
    for ax in axes:
        if rng.random() < prob:
            vol = np.flip(vol, ax)
            if mask is not None:
                mask = np.flip(mask, ax)
    return vol, mask
