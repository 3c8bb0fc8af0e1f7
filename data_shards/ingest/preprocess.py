"""Raw CT -> stored int16 HU volume: RAS, rescale exactly once, resample, clip, crop/pad.

Axis convention after `to_ras`: array index (i, j, k) grows towards (R, A, S); the stored
volume is transposed to (D, H, W) = (S, A, R) so that D is the slice axis.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .readers import CaseError, RawCT

HU_AIR = -1000.0


def to_ras(raw: RawCT) -> tuple[np.ndarray, np.ndarray]:
    """Reorient to the closest canonical RAS grid (axis flips/permutations only, no resampling)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(raw.affine)
    arr = nib.orientations.apply_orientation(np.asarray(raw.array), ornt)
    affine = raw.affine @ nib.orientations.inv_ornt_aff(ornt, raw.array.shape)
    return arr, affine


def spacing_of(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def decide_rescale(arr: np.ndarray, slope: Optional[float], intercept: Optional[float], mode: str) -> tuple[bool, str]:
    """Apply RescaleSlope/Intercept once, and only to raw detector values.

    Raw CT stored values are non-negative-ish (air near 0, water near 1024 with intercept
    -1024). Data already in HU has air near -1000. CT-RATE v2 NIfTI is already HU; a known
    public loader rescales it a second time, shifting everything by -1024.
    """
    if slope is None or intercept is None or (slope == 1 and intercept == 0):
        return False, "no rescale parameters"
    if mode == "never":
        return False, "rescale disabled"
    if mode == "always":
        return True, "rescale forced"
    lo = float(np.percentile(arr[:: max(1, arr.shape[0] // 32)], 1))
    if lo < -500:
        return False, f"already HU (1st percentile {lo:.0f})"
    return True, f"raw stored values (1st percentile {lo:.0f}); applied slope {slope:g}, intercept {intercept:g}"


def resample(arr: np.ndarray, spacing: np.ndarray, target: np.ndarray, order: str = "linear") -> np.ndarray:
    """Resample a (D, H, W) array from `spacing` to `target` mm (same physical extent)."""
    size = np.maximum(1, np.round(np.array(arr.shape) * spacing / target)).astype(int)
    if tuple(size) == arr.shape:
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    mode = "trilinear" if order == "linear" else "nearest-exact"
    kw = {"align_corners": False} if mode == "trilinear" else {}
    out = F.interpolate(t, size=tuple(int(s) for s in size), mode=mode, **kw)
    return out[0, 0].numpy()


def crop_or_pad(arr: np.ndarray, shape, value) -> tuple[np.ndarray, list[int]]:
    """Centre crop/pad to `shape`; returns the offset of the input's origin in the output."""
    out = np.full(shape, value, dtype=arr.dtype)
    src, dst, offset = [], [], []
    for n, m in zip(arr.shape, shape):
        if n >= m:
            a = (n - m) // 2
            src.append(slice(a, a + m)); dst.append(slice(0, m)); offset.append(-a)
        else:
            a = (m - n) // 2
            src.append(slice(0, n)); dst.append(slice(a, a + n)); offset.append(a)
    out[tuple(dst)] = arr[tuple(src)]
    return out, offset


def preprocess(raw: RawCT, cfg, mask: Optional[np.ndarray] = None,
               rescale_override: Optional[tuple[float, float]] = None) -> tuple[np.ndarray, Optional[np.ndarray], dict]:
    """Returns (int16 volume (D,H,W), uint8 mask or None, metadata facts)."""
    if raw.modality and raw.modality != "CT":
        raise CaseError(f"modality is {raw.modality}, not CT")
    arr = np.asarray(raw.array)
    if arr.size == 0 or min(arr.shape) < 2:
        raise CaseError(f"volume too small: shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise CaseError("volume contains NaN or infinite voxels")
    slope, inter = rescale_override if rescale_override else (raw.slope, raw.intercept)
    apply, why = decide_rescale(arr, slope, inter, cfg.rescale)
    if apply:
        arr = arr.astype(np.float32) * float(slope) + float(inter)
    spacing_src = spacing_of(raw.affine)
    if not np.all(np.isfinite(spacing_src)) or spacing_src.min() < cfg.min_spacing or spacing_src.max() > cfg.max_spacing:
        raise CaseError(f"absurd voxel spacing {np.round(spacing_src, 4).tolist()} mm "
                        f"(allowed {cfg.min_spacing}..{cfg.max_spacing})")
    ras, affine = to_ras(RawCT(arr, raw.affine, raw.source))
    dhw = np.transpose(ras, (2, 1, 0))  # (R, A, S) -> (S, A, R)
    sp = spacing_of(affine)[::-1]  # (S, A, R) order
    lo, hi = float(np.min(dhw)), float(np.max(dhw))
    if lo > -500 or hi < 0:
        raise CaseError(f"intensities {lo:.0f}..{hi:.0f} are not a CT Hounsfield range "
                        f"(no air below -500 HU: wrong modality, or raw values without rescale?)")
    target = np.array(cfg.spacing, dtype=float)
    res = resample(dhw, sp, target)
    vol = np.clip(np.rint(res), -32768, 32767).astype(np.int16)
    vol, offset = crop_or_pad(vol, tuple(cfg.stored_shape), np.int16(cfg.pad_value))
    m = None
    if mask is not None:
        mras, _ = to_ras(RawCT(mask, raw.affine, raw.source))
        mdhw = np.transpose(mras, (2, 1, 0))
        if mdhw.shape != dhw.shape:
            raise CaseError(f"mask shape {mask.shape} differs from image shape {raw.array.shape}")
        m = resample(mdhw.astype(np.float32), sp, target, order="nearest").astype(np.uint8)
        m, _ = crop_or_pad(m, tuple(cfg.stored_shape), np.uint8(0))
    meta = {
        "spacing": [float(x) for x in target],
        "source_spacing": [round(float(x), 6) for x in sp],
        "source_shape": [int(x) for x in dhw.shape],
        "orientation": "RAS",
        "axes": ["S", "A", "R"],
        "crop_offset": offset,
        "hu_source_range": [lo, hi],
        "rescale_applied": bool(apply),
        "rescale_reason": why,
        "pad_value": int(cfg.pad_value),
    }
    return vol, m, meta
