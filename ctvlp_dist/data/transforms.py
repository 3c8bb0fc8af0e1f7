"""Volume transforms on numpy (D, H, W) arrays, driven by a per-sample RNG so that
augmentation is reproducible by (seed, epoch, position) whatever the worker count.

Crops and flips return views; `window_into` does the one real pass, writing the int16 view
straight into the batch tensor as float32 and windowing it in place.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def window_into(dst: torch.Tensor, vol: np.ndarray, window, out_range) -> torch.Tensor:
    """dst <- vol clipped to the HU window, mapped linearly onto out_range
    (seed paper: [-1000, 200] -> [-1, 1]). One strided copy, then in-place vector ops."""
    lo, hi = float(window[0]), float(window[1])
    a, b = float(out_range[0]), float(out_range[1])
    np.copyto(dst.numpy(), vol, casting="unsafe")
    return dst.clamp_(lo, hi).sub_(lo).mul_((b - a) / (hi - lo)).add_(a)


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
