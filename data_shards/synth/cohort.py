"""`ctvlp synth`: a deterministic, streaming synthetic cohort.

Everything about patient i comes from RNG streams seeded by (seed, i, purpose), so any
patient can be regenerated alone, workers need no shared state, and a 69k cohort never
sits in memory. Default: straight into shards at the stored grid. `synth.raw=true`: NIfTI
files at real CT-RATE spacings and sizes plus CT-RATE-style CSVs, to exercise `ctvlp shard`.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from data_shards.label_sets import load_label_set

from ..format import ANATOMY_LABELS
from ..parallel import bounded_map
from ..sample import Sample
from ..split import assign_splits
from ..writer import DatasetWriter
from .canvas import Canvas
from .phantom import draw_anatomy, render
from .reports import write_report

# CT-RATE validation metadata (3,039 volumes): deciles of XY and Z spacing (mm) and of the
# number of slices, and the share of each matrix size. Raw volumes are drawn from these.
XY_DECILES = [0.281, 0.342, 0.377, 0.437, 0.617, 0.682, 0.692, 0.727, 0.756, 0.801, 0.977]
Z_DECILES = [0.75, 0.75, 0.75, 1.0, 1.0, 1.25, 1.5, 1.5, 1.5, 1.5, 5.0]
SLICES_DECILES = [100, 203, 221, 232, 244, 256, 287, 340, 437, 487, 1617]
ROWS_SHARE = {512: 0.650, 768: 0.041, 1024: 0.309}


def patient_id(i: int) -> str:
    return f"synth_{i:06d}"


def scan_key(i: int, r: int) -> str:
    return f"{patient_id(i)}_a_{r + 1}"  # CT-RATE naming: <patient>_<study>_<reconstruction>


def patient_labels(seed: int, i: int, label_set: str = "ctrate18") -> dict[str, bool]:
    ls = load_label_set(label_set)
    u = np.random.default_rng([seed, i, 0]).random(len(ls.findings))
    return {f.name: bool(x < f.prevalence) for f, x in zip(ls.findings, u)}


def _rngs(seed: int, i: int, names) -> dict:
    out = {n: np.random.default_rng([seed, i, 100 + k]) for k, n in enumerate(names)}
    out["anatomy"] = np.random.default_rng([seed, i, 1])
    return out


@dataclass
class ScanJob:
    seed: int
    patient: int
    recon: int
    shape: tuple
    spacing: tuple
    noise_hu: float
    label_set: str = "ctrate18"
    only: Optional[dict] = None  # override labels (tests toggle single findings)


def render_scan(job: ScanJob) -> tuple[np.ndarray, np.ndarray, dict, str, dict, list[dict]]:
    """-> (int16 HU volume (D,H,W), uint8 mask, labels, report, details, sentence truth)."""
    labels = job.only if job.only is not None else patient_labels(job.seed, job.patient, job.label_set)
    cv = Canvas(job.shape, job.spacing)
    anatomy = draw_anatomy(np.random.default_rng([job.seed, job.patient, 1, 1]))
    details = render(cv, anatomy, labels, _rngs(job.seed, job.patient, list(labels)))
    noise = np.random.default_rng([job.seed, job.patient, job.recon, 7]).normal(0, job.noise_hu, cv.shape)
    vol = np.clip(np.rint(cv.hu + noise), -32768, 32767).astype(np.int16)
    anatomy_of = {f.name: f.anatomy for f in load_label_set(job.label_set).findings}
    report, truth = write_report(labels, details, np.random.default_rng([job.seed, job.patient, 2]), anatomy_of=anatomy_of)
    return vol, cv.label, labels, report, details, truth


def _make_sample(job: ScanJob) -> tuple[Sample, dict, list[dict]]:
    vol, mask, labels, report, _, truth = render_scan(job)
    meta = {"patient_id": patient_id(job.patient), "study_id": f"{patient_id(job.patient)}_a",
            "spacing": [float(s) for s in job.spacing], "orientation": "RAS", "axes": ["S", "A", "R"],
            "source_file": "synthetic", "synthetic": True, "mask_labels": ANATOMY_LABELS,
            "rescale_applied": False, "hu_window_applied": None}
    return Sample(key=scan_key(job.patient, job.recon), volume=vol, report=report, meta=meta, mask=mask), labels, truth


def _jobs(cfg, shape, spacing):
    sc = cfg.synth
    for i in range(sc.patients):
        for r in range(sc.scans_per_patient):
            yield ScanJob(sc.seed, i, r, tuple(shape), tuple(spacing), sc.noise_hu, cfg.shard.label_set)


def run_synth(cfg, progress: bool = True, on_case=None) -> dict:
    sc = cfg.synth
    if not sc.out:
        raise ValueError("synth.out is required: where to write the cohort (ctvlp synth --out DIR)")
    if sc.raw:
        return run_synth_raw(cfg, progress)
    shape = sc.shape or cfg.preprocess.stored_shape
    spacing = sc.spacing or cfg.preprocess.spacing
    names = load_label_set(cfg.shard.label_set).names
    splits = assign_splits([patient_id(i) for i in range(sc.patients)], cfg.shard.split_fractions, cfg.shard.split_seed)
    pre = {"stored_shape": list(shape), "spacing": list(spacing), "pad_value": cfg.preprocess.pad_value,
           "synthetic": True, "noise_hu": sc.noise_hu, "seed": sc.seed}
    out = Path(sc.out)
    out.mkdir(parents=True, exist_ok=True)
    n = sc.patients * sc.scans_per_patient
    gt_path = out / "ground_truth.csv"
    with open(str(gt_path) + ".partial", "w", newline="") as gf, SentenceTruth(out) as st, \
            DatasetWriter(out, cfg.shard, preprocess=pre, patient_splits=splits, cases_total=n,
                          source={"kind": "synthetic", "patients": sc.patients, "seed": sc.seed}, on_case=on_case) as w:
        gw = csv.writer(gf)
        gw.writerow(["AccessionNo", "report_text", *names])  # same layout as the CT-RATE dev file
        it = bounded_map(_make_sample, _jobs(cfg, shape, spacing), workers=sc.workers)
        for sample, labels, truth in tqdm(it, total=n, desc="synth", unit="scan", disable=not progress):
            w.write(sample)
            gw.writerow([sample.key, sample.report, *[int(labels[k]) for k in names]])
            st.write(sample.key, truth)
    Path(str(gt_path) + ".partial").replace(gt_path)
    return {"cases_in": n, "samples_written": w.written, "rejected": len(w.rejected), "out": str(out)}


class SentenceTruth:
    """sentence_truth.jsonl: one line per report sentence (key, index, section, sentence, finding,
    stated, anatomy), written as `.partial` and renamed when complete."""

    def __init__(self, out: Path):
        self.path = Path(out) / "sentence_truth.jsonl"

    def __enter__(self):
        self.f = open(str(self.path) + ".partial", "w")
        return self

    def write(self, key: str, truth: list[dict]) -> None:
        for i, t in enumerate(truth):
            self.f.write(json.dumps({"key": key, "index": i, **t}) + "\n")

    def __exit__(self, exc_type, *_):
        self.f.close()
        if exc_type is None:
            Path(str(self.path) + ".partial").replace(self.path)


def _draw(rng, deciles):
    return float(np.interp(rng.random(), np.linspace(0, 1, len(deciles)), deciles))


def raw_geometry(seed: int, i: int, scale: float) -> tuple[tuple, tuple]:
    """(shape (D,H,W), spacing (D,H,W) mm) drawn from CT-RATE's real spread; `scale` shrinks
    the matrix and enlarges the spacing by the same factor, keeping the field of view."""
    rng = np.random.default_rng([seed, i, 3])
    rows = int(rng.choice(list(ROWS_SHARE), p=list(ROWS_SHARE.values())))
    xy, z, ns = _draw(rng, XY_DECILES), _draw(rng, Z_DECILES), int(round(_draw(rng, SLICES_DECILES)))
    ns = min(ns, int(round(360 / z)))  # keep the phantom's chest in the field
    n_xy, n_z = max(8, int(round(rows * scale))), max(8, int(round(ns * scale)))
    return (n_z, n_xy, n_xy), (z * ns / n_z, xy * rows / n_xy, xy * rows / n_xy)


def _make_raw(job_and_out):
    job, out = job_and_out
    import nibabel as nib

    vol, _, labels, report, _, truth = render_scan(job)
    key = scan_key(job.patient, job.recon)
    arr = np.transpose(vol, (2, 1, 0))  # (S,A,R) -> (R,A,S) voxel order (i, j, k)
    sz, sy, sx = job.spacing
    aff = np.diag([sx, sy, sz, 1.0])
    if job.patient % 2:  # every other file stored LPS, as DICOM-derived NIfTI often is
        arr = arr[::-1, ::-1, :]
        aff = np.diag([-sx, -sy, sz, 1.0])
        aff[:3, 3] = [sx * (arr.shape[0] - 1), sy * (arr.shape[1] - 1), 0]
    img = nib.Nifti1Image(np.ascontiguousarray(arr), aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    nib.save(img, str(Path(out) / "volumes" / f"{key}.nii.gz"))
    return key, labels, report, job.shape, job.spacing, truth


def run_synth_raw(cfg, progress: bool = True) -> dict:
    sc = cfg.synth
    out = Path(sc.out)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    names = load_label_set(cfg.shard.label_set).names
    jobs = []
    for i in range(sc.patients):
        shape, spacing = raw_geometry(sc.seed, i, sc.raw_scale)
        for r in range(sc.scans_per_patient):
            jobs.append((ScanJob(sc.seed, i, r, shape, spacing, sc.noise_hu, cfg.shard.label_set), out))
    with open(out / "reports.csv", "w", newline="") as rf, open(out / "labels.csv", "w", newline="") as lf, \
            open(out / "metadata.csv", "w", newline="") as mf, SentenceTruth(out) as st:
        rw, lw, mw = csv.writer(rf), csv.writer(lf), csv.writer(mf)
        rw.writerow(["VolumeName", "Findings_EN", "Impressions_EN"])
        lw.writerow(["VolumeName", *names])
        mw.writerow(["VolumeName", "Rows", "Columns", "NumberofSlices", "XYSpacing", "ZSpacing",
                     "RescaleIntercept", "RescaleSlope"])
        it = bounded_map(_make_raw, jobs, workers=sc.workers)
        for key, labels, report, shape, spacing, truth in tqdm(it, total=len(jobs), desc="synth raw",
                                                               disable=not progress):
            st.write(key, truth)
            fnd, imp = report.split("\nImpression: ")
            vn = f"{key}.nii.gz"
            rw.writerow([vn, fnd.removeprefix("Findings: "), imp])
            lw.writerow([vn, *[int(labels[k]) for k in names]])
            # Like CT-RATE v2: the NIfTI is already HU but the metadata still lists the DICOM
            # rescale. Ingest must not apply it a second time.
            mw.writerow([vn, shape[1], shape[2], shape[0], f"[{spacing[1]:.6f}, {spacing[2]:.6f}]",
                         f"{spacing[0]:.6f}", -1024, 1])
    return {"cases_in": len(jobs), "files_written": len(jobs), "rejected": 0, "out": str(out)}
