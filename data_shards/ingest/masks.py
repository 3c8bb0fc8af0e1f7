"""Anatomy masks: TotalSegmentator outputs merged into the anatomies of a map.

TotalSegmentator writes either one multi-label file (`--ml`: each voxel holds its class's
value in the `total` task) or a folder of per-class binary files named `<class>.nii.gz`. An
anatomy map (`resources/anatomy/*.yaml`, or a YAML of one's own) lists, in label order, each
anatomy's classes; the merged mask holds anatomy i at value i + 1. A voxel claimed by two
anatomies keeps the earlier one. Already merged label maps (`ingest.mask_source: labels`) are
read as they are. An anatomy missing or empty in a case is reported, never a reject: fVLM
drops such organs per sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from ..label_sets import RESOURCES
from .readers import CaseError, read_nifti

ANATOMY_DIR = RESOURCES / "anatomy"


@lru_cache(maxsize=None)
def totalsegmentator_classes() -> dict[int, str]:
    """TotalSegmentator v2 `total`: multi-label value -> class name."""
    data = yaml.safe_load((ANATOMY_DIR / "totalsegmentator_v2.yaml").read_text())
    return {int(k): str(v) for k, v in data["classes"].items()}


@dataclass(frozen=True)
class AnatomyMap:
    name: str
    anatomies: tuple[str, ...]  # label value i + 1
    classes: tuple[tuple[str, ...], ...]  # per anatomy, its TotalSegmentator classes
    words: tuple[tuple[str, ...], ...] = ()  # per anatomy, regexes naming it (the rules report split)

    @property
    def labels(self) -> dict[str, int]:
        return {a: i + 1 for i, a in enumerate(self.anatomies)}


@lru_cache(maxsize=None)
def load_anatomy_map(name_or_path: str = "fvlm4") -> AnatomyMap:
    p = Path(name_or_path)
    if not p.suffix:
        p = ANATOMY_DIR / f"{name_or_path}.yaml"
    if not p.exists() or p.name == "totalsegmentator_v2.yaml":
        known = sorted(x.stem for x in ANATOMY_DIR.glob("*.yaml") if x.stem != "totalsegmentator_v2")
        raise FileNotFoundError(f"anatomy map {name_or_path!r} not found; shipped maps: {known}, or give a YAML path")
    data = yaml.safe_load(p.read_text()) or {}
    anat = data.get("anatomies")
    if not isinstance(anat, dict) or not anat:
        raise ValueError(f"{p}: `anatomies` must map each anatomy to a list of TotalSegmentator classes")
    known = set(totalsegmentator_classes().values())
    seen: dict[str, str] = {}
    for a, cls in anat.items():
        if not isinstance(cls, list) or not cls:
            raise ValueError(f"{p}: anatomy {a!r} needs a non-empty list of classes")
        bad = [c for c in cls if c not in known]
        if bad:
            raise ValueError(f"{p}: anatomy {a!r}: {bad} are not TotalSegmentator v2 `total` classes "
                             f"(see resources/anatomy/totalsegmentator_v2.yaml)")
        for c in cls:
            if c in seen:
                raise ValueError(f"{p}: class {c!r} is in both {seen[c]!r} and {a!r}")
            seen[c] = a
    words = data.get("words") or {}
    unknown = set(words) - set(anat)
    if unknown:
        raise ValueError(f"{p}: `words` names {sorted(unknown)}, which are not among its anatomies")
    if len(anat) > 255:
        raise ValueError(f"{p}: at most 255 anatomies fit a uint8 mask")
    return AnatomyMap(str(data.get("name", p.stem)), tuple(anat), tuple(tuple(c) for c in anat.values()),
                      tuple(tuple(words.get(a, ())) for a in anat))


def merge_multilabel(arr: np.ndarray, amap: AnatomyMap) -> np.ndarray:
    """A multi-label TotalSegmentator volume -> the anatomy label map (uint8)."""
    index = {n: v for v, n in totalsegmentator_classes().items()}
    lut = np.zeros(max(index.values()) + 1, dtype=np.uint8)
    for value in reversed(range(len(amap.anatomies))):  # earlier anatomies written last: they win
        for c in amap.classes[value]:
            lut[index[c]] = value + 1
    a = np.asarray(arr)
    if a.dtype.kind == "f":
        a = np.rint(a)
    a = a.astype(np.int64)
    if a.min() < 0 or a.max() >= len(lut):
        raise CaseError(f"mask values {a.min()}..{a.max()} are not TotalSegmentator v2 `total` classes (0..{len(lut) - 1})")
    return lut[a]


def read_mask(path: Path, amap: Optional[AnatomyMap]) -> tuple[np.ndarray, list[str]]:
    """-> (uint8 anatomy label map in the image's voxel grid, anatomies with no input at all).

    `path` a folder: per-class files; a file: one multi-label volume, merged with `amap`, or,
    when `amap` is None, an already merged label map."""
    path = Path(path)
    if not path.is_dir():
        arr = np.asarray(read_nifti(path).array)
        return (arr.astype(np.uint8) if amap is None else merge_multilabel(arr, amap)), []
    if amap is None:
        raise CaseError(f"{path.name}/ is a folder of per-class masks, but ingest.mask_source is labels")
    out: Optional[np.ndarray] = None
    missing = []
    for value, classes in enumerate(amap.classes, 1):
        found = False
        for c in classes:
            f = next((x for x in (path / f"{c}.nii.gz", path / f"{c}.nii") if x.exists()), None)
            if f is None:
                continue
            m = np.asarray(read_nifti(f).array)
            if out is None:
                out = np.zeros(m.shape, dtype=np.uint8)
            elif m.shape != out.shape:
                raise CaseError(f"{path.name}/{f.name} has shape {m.shape}, the other class files {out.shape}")
            out[(m > 0) & (out == 0)] = value
            found = True
        if not found:
            missing.append(amap.anatomies[value - 1])
    if out is None:
        raise CaseError(f"{path.name}/ holds none of the map's class files (e.g. {amap.classes[0][0]}.nii.gz)")
    return out, missing


def mask_gaps(mask: np.ndarray, labels: dict[str, int], missing: list[str]) -> dict:
    """Which anatomies a stored mask lacks: `missing` (no input) and `empty` (no voxel left
    after resampling and the crop)."""
    present = set(np.unique(mask).tolist())
    empty = [a for a, v in labels.items() if v not in present and a not in missing]
    return {"missing": list(missing), "empty": empty}
