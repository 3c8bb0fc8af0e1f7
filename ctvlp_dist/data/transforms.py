"""Volume transforms on numpy (D, H, W) arrays, and the per-sample draws behind them.

A sample's crop, flips and text view are drawn from `sample_rng(seed, epoch, key)`: they depend
on nothing else, so the torch and DALI loaders, any sharding and any worker count give a sample
the same augmentation in the same epoch. Crops and flips return views; `window_into` does the
one real pass, writing the int16 view straight into the batch tensor as float32.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np
import torch

AUGMENT, TEXT = 0xC0, 0x7E  # the two streams a sample draws from


def sample_rng(seed: int, epoch: int, key: str, stream: int = AUGMENT) -> np.random.Generator:
    """The generator of one sample in one epoch: a function of (seed, epoch, key) only."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, h, stream])


def crop_anchor(shape, size, rng: Optional[np.random.Generator]) -> list[int]:
    """Where a `size` crop starts on each axis of a `shape` volume: uniform over the valid starts
    (rng given) or centred (rng None). An axis shorter than the crop is padded, (m - n) // 2
    before it, so its anchor is negative; DALI's slice takes these anchors as they are."""
    out = []
    for n, m in zip(shape, size):
        before = max(0, m - n) // 2
        span = max(n, m) - m
        out.append((int(rng.integers(0, span + 1)) if rng is not None else span // 2) - before)
    return out


def flip_draws(axes, prob: float, rng: np.random.Generator) -> list[int]:
    """Which of the 3 axes to flip (drawn after the crop, in the order of `axes`)."""
    flips = [0, 0, 0]
    for ax in axes:
        flips[ax] = int(rng.random() < prob)
    return flips


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
    anchor = crop_anchor(vol.shape, size, rng)
    sl = tuple(slice(a + max(0, m - n) // 2, a + max(0, m - n) // 2 + m) for a, n, m in zip(anchor, vol.shape, size))
    vol = _pad_to(vol, size, pad_value)
    if mask is not None:
        mask = _pad_to(mask, size, 0)
    return vol[sl], (mask[sl] if mask is not None else None)


def random_flip(vol: np.ndarray, mask: Optional[np.ndarray], axes, prob: float, rng: np.random.Generator):
    for ax, f in enumerate(flip_draws(axes, prob, rng)):
        if f:
            vol = np.flip(vol, ax)
            if mask is not None:
                mask = np.flip(mask, ax)
    return vol, mask
