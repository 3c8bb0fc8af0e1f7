"""The on-disk contract every later stage reads. Bump FORMAT_VERSION on any change.

A sample is a group of tar members sharing a key (WebDataset convention, key has no dots):
  {key}.vol.npy | {key}.vol.lz4   int16 HU volume, C order, (D, H, W) = (S, A, R) axes
  {key}.json                      metadata: shape, spacing, orientation, codec, ids, ...
  {key}.txt                       report text (UTF-8)
  {key}.mask.npy | .mask.lz4      optional uint8 anatomy mask, same shape; label map in json
"""
from __future__ import annotations

import re

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VOLUME_EXT = {"npy": "vol.npy", "lz4": "vol.lz4"}
MASK_EXT = {"npy": "mask.npy", "lz4": "mask.lz4"}
META_EXT = "json"
REPORT_EXT = "txt"
REQUIRED = ("volume", META_EXT, REPORT_EXT)
KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
ORIENTATION = "RAS"  # index increases towards S (D axis), A (H axis), R (W axis)
AXES = ("S", "A", "R")

# The anatomy labels that synthetic masks carry (fVLM's CT-RATE anatomies first).
ANATOMY_LABELS = {"lung": 1, "heart": 2, "aorta": 3, "esophagus": 4, "trachea": 5, "bone": 6}


# Columns that name a report's or a label row's sample, in the real formats we read
# (CT-RATE dev file: AccessionNo; CT-RATE tables: VolumeName; our own files: key).
KEY_COLUMNS = ("AccessionNo", "VolumeName", "key")


def strip_volume_ext(name: str) -> str:
    """'train_1_a_1.nii.gz' -> 'train_1_a_1': volume file names and sample keys match this way."""
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def check_key(key: str) -> str:
    if not KEY_RE.match(key):
        raise ValueError(f"sample key {key!r} must match {KEY_RE.pattern} (no dots, no slashes)")
    return key


def split_member(name: str) -> tuple[str, str]:
    """'p1_s0.vol.npy' -> ('p1_s0', 'vol.npy'); WebDataset splits at the first dot."""
    key, dot, ext = name.partition(".")
    if not dot:
        raise ValueError(f"tar member {name!r} has no extension")
    return key, ext


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_name(shard: str) -> str:
    return shard[: -len(".tar")] + ".idx"
