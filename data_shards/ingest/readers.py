"""Read a CT from disk into (array in voxel order, affine in RAS mm, header facts).

NIfTI: nibabel applies the header's own scl_slope/scl_inter (that is the file's contract).
DICOM: raw stored values plus RescaleSlope/Intercept, applied later exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..format import strip_volume_ext


class CaseError(ValueError):
    """A case that cannot be ingested; becomes a counted, logged reject."""


@dataclass
class RawCT:
    array: np.ndarray  # voxel grid (i, j, k), float or int
    affine: np.ndarray  # 4x4 voxel -> RAS mm
    source: str
    modality: Optional[str] = "CT"
    slope: Optional[float] = None  # DICOM rescale still to apply (None: already applied / none)
    intercept: Optional[float] = None
    ids: dict = field(default_factory=dict)  # patient_id / study_id when the file carries them


def is_nifti(p: Path) -> bool:
    return p.name.endswith((".nii", ".nii.gz"))


def case_name(p: Path) -> str:
    return strip_volume_ext(p.name)


def read_nifti(path: Path) -> RawCT:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # applies header scaling when present
    except Exception as e:
        raise CaseError(f"unreadable NIfTI: {type(e).__name__}: {e}") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(f"expected a 3D volume, got shape {data.shape}")
    return RawCT(np.asarray(data), np.asarray(img.affine, dtype=float), str(path))


def read_dicom_series(folder: Path) -> RawCT:
    """One series per folder; slices sorted along the slice normal; LPS -> RAS affine."""
    import pydicom

    slices = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(f), force=False)
        except Exception:
            continue  # not a DICOM file (DICOMDIR, readme, ...)
        if "PixelData" in ds:
            slices.append(ds)
    if not slices:
        raise CaseError("no readable DICOM images in folder")
    modality = str(getattr(slices[0], "Modality", "") or "")
    if modality and modality != "CT":
        raise CaseError(f"modality is {modality}, not CT")
    series = {str(getattr(s, "SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise CaseError(f"folder holds {len(series)} series; put one series per folder")
    try:
        iop = np.array(slices[0].ImageOrientationPatient, dtype=float)
        row, col = iop[:3], iop[3:]
        normal = np.cross(row, col)
        slices.sort(key=lambda s: float(np.dot(normal, np.array(s.ImagePositionPatient, dtype=float))))
        pos = [np.array(s.ImagePositionPatient, dtype=float) for s in slices]
        ps = [float(x) for x in slices[0].PixelSpacing]  # (row spacing, column spacing)
        arr = np.stack([s.pixel_array for s in slices], axis=-1)  # (rows, cols, slices)
    except Exception as e:
        raise CaseError(f"cannot assemble DICOM series: {type(e).__name__}: {e}") from e
    if len(pos) > 1:
        steps = np.diff([float(np.dot(normal, p)) for p in pos])
        if np.any(steps <= 0):
            raise CaseError("duplicate slice positions in series")
        if steps.max() - steps.min() > 0.01 * max(steps.mean(), 1e-6) + 1e-3:
            raise CaseError(f"uneven slice spacing ({steps.min():.3f}..{steps.max():.3f} mm)")
        dz = (pos[-1] - pos[0]) / (len(pos) - 1)
    else:
        thick = float(getattr(slices[0], "SliceThickness", 0) or getattr(slices[0], "SpacingBetweenSlices", 0) or 1.0)
        dz = normal * thick
    # LPS affine for voxel (r, c, s): x = pos0 + c*col_step... DICOM: row direction steps along columns.
    lps = np.eye(4)
    lps[:3, 0] = col * ps[0]  # moving down rows (index i) follows the column direction cosine
    lps[:3, 1] = row * ps[1]  # moving along columns (index j) follows the row direction cosine
    lps[:3, 2] = dz
    lps[:3, 3] = pos[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    s0 = slices[0]
    slope = float(getattr(s0, "RescaleSlope", 1) or 1)
    inter = float(getattr(s0, "RescaleIntercept", 0) or 0)
    ids = {"patient_id": str(getattr(s0, "PatientID", "") or ""), "study_id": str(getattr(s0, "StudyInstanceUID", "") or "")}
    return RawCT(arr, affine, str(folder), modality or "CT", slope, inter, ids)


def read_case(path: Path) -> RawCT:
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if is_nifti(path):
        return read_nifti(path)
    raise CaseError(f"not a NIfTI file or DICOM folder: {path.name}")


def discover_cases(images: Path) -> list[Path]:
    """NIfTI files anywhere below `images`, plus each folder that directly holds DICOM files."""
    images = Path(images)
    if not images.exists():
        raise FileNotFoundError(f"--images {images} does not exist")
    cases = sorted(p for p in images.rglob("*") if p.is_file() and is_nifti(p))
    for d in sorted({p.parent for p in images.rglob("*") if p.is_file() and not is_nifti(p)}):
        if any(_looks_dicom(f) for f in d.iterdir() if f.is_file()):
            cases.append(d)
    return cases


def _looks_dicom(f: Path) -> bool:
    if f.suffix.lower() == ".dcm":
        return True
    try:
        with open(f, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False
