"""Ingest driver: discover cases, preprocess in parallel, stream into shards, count rejects.

Every case ends as exactly one written sample or one reject with its reason, so
cases in = samples written + rejected, and the last line says so.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from ..parallel import bounded_map
from ..sample import Sample
from ..split import assign_splits
from ..writer import DatasetWriter
from .masks import load_anatomy_map, mask_gaps, read_mask
from .preprocess import preprocess
from .readers import CaseError, case_name, discover_cases, read_case
from .reports import load_reports, load_rescale_table

log = logging.getLogger(__name__)


@dataclass
class _Job:
    path: Path
    name: str
    report: Optional[str]
    mask: Optional[Path]
    rescale: Optional[tuple[float, float]]
    ids: dict


def _ids_for(name: str, regex: str) -> dict:
    m = re.match(regex, name)
    if m and "patient" in m.groupdict():
        gd = m.groupdict()
        return {"patient_id": gd["patient"], "study_id": gd.get("study") and f"{gd['patient']}_{gd['study']}" or name}
    return {"patient_id": name, "study_id": name}


def _sanitize_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)


def _process(job_and_cfg):
    """Worker: one case -> ('ok', Sample, mask gaps or None) or ('reject', name, reason). Never
    raises. With masks configured, a case without its mask gets an empty one (every anatomy
    `missing`), so that all samples carry a mask."""
    job, pcfg, masks = job_and_cfg
    try:
        if job.report is None:
            raise CaseError("no report for this volume in the reports CSV")
        if not job.report.strip():
            raise CaseError("report is empty")
        raw = read_case(job.path)
        mask, missing = None, []
        if masks is not None:
            amap, labels = masks
            if job.mask is not None:
                mask, missing = read_mask(job.mask, amap)
            else:
                mask, missing = np.zeros(np.shape(raw.array), dtype=np.uint8), list(labels)
        vol, m, facts = preprocess(raw, pcfg, mask=mask, rescale_override=job.rescale)
        ids = {k: v for k, v in raw.ids.items() if v} or job.ids
        ids = {**job.ids, **ids}
        meta = {**facts, **ids, "source_file": str(job.path.name), "hu_window_applied": None}
        gaps = None
        if m is not None:
            meta["mask_labels"] = dict(labels)
            gaps = mask_gaps(m, labels, missing)
            gaps = {"case": job.name, **gaps} if gaps["missing"] or gaps["empty"] else None
        return ("ok", Sample(key=_sanitize_key(job.name), volume=vol, report=job.report, meta=meta, mask=m), gaps)
    except CaseError as e:
        return ("reject", job.name, str(e))
    except Exception as e:  # an unexpected failure is still one counted reject, not a crash
        return ("reject", job.name, f"{type(e).__name__}: {e}")


def _dicom_patient(job: _Job) -> Optional[dict]:
    """A DICOM series carries its PatientID: take it, so that the split is by real patient. When
    it cannot be read, the id from the file name stays, and the returned note (case, reason, the
    id fallen back to) goes to ingest_report.json and the log: a wrong id can put one patient in
    two splits."""
    import pydicom

    try:
        f = next((x for x in sorted(job.path.iterdir()) if x.is_file()), None)
        if f is None:
            raise ValueError("no file in the series folder")
        ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        if not str(getattr(ds, "PatientID", "")).strip():
            raise ValueError(f"{f.name} has no PatientID")
    except Exception as e:  # any unreadable header: counted and shown, never silent
        note = {"case": job.name, "reason": f"PatientID unreadable ({type(e).__name__}: {e})",
                "fell_back_to": job.ids["patient_id"]}
        log.warning("%s: %s; using patient id %r from the file name", note["case"], note["reason"],
                    note["fell_back_to"])
        return note
    job.ids = {"patient_id": str(ds.PatientID), "study_id": str(getattr(ds, "StudyInstanceUID", job.name))}
    return None


def run_ingest(cfg, progress: bool = True, on_case=None) -> dict:
    ic, pc, sc = cfg.ingest, cfg.preprocess, cfg.shard
    cases = discover_cases(Path(ic.images))
    reports = load_reports(ic.reports, ic.key_column, ic.findings_column, ic.impressions_column, ic.text_column)
    rescale = load_rescale_table(ic.metadata) if ic.metadata else {}
    masks_dir = Path(ic.masks) if ic.masks else None
    jobs = []
    for p in cases:
        name = case_name(p)
        mpath = None
        if masks_dir is not None:
            # one file (a label map, or TotalSegmentator's --ml output) or a folder of per-class files
            cand = [masks_dir / p.name, masks_dir / f"{name}.nii.gz", masks_dir / f"{name}.nii", masks_dir / name]
            mpath = next((c for c in cand if c.exists()), None)
        jobs.append(_Job(p, name, reports.get(name), mpath, rescale.get(name), _ids_for(name, ic.patient_regex)))
    masks = None
    if masks_dir is not None:
        amap = load_anatomy_map(ic.mask_map) if ic.mask_source == "totalsegmentator" else None
        masks = (amap, amap.labels if amap else dict(ic.mask_labels))
    fallbacks = [f for j in jobs if j.path.is_dir() and (f := _dicom_patient(j)) is not None]
    splits = assign_splits([j.ids["patient_id"] for j in jobs], sc.split_fractions, sc.split_seed)
    keys_seen: set[str] = set()
    with DatasetWriter(ic.out, sc, preprocess=pc, patient_splits=splits, cases_total=len(jobs),
                       source={"images": str(ic.images), "reports": str(ic.reports), "kind": "ingest"},
                       patient_id_fallbacks=fallbacks, on_case=on_case) as w:
        it = bounded_map(_process, [(j, pc, masks) for j in jobs], workers=ic.workers)
        for res in tqdm(it, total=len(jobs), desc="ingest", unit="case", disable=not progress):
            if res[0] == "reject":
                w.reject(res[1], res[2])
                continue
            sample = res[1]
            if sample.key in keys_seen:
                w.reject(sample.key, "duplicate sample key (two files map to the same name)")
                continue
            keys_seen.add(sample.key)
            w.write(sample)
            if res[2] is not None:
                w.note_mask_gap(res[2])
    summary = {"cases_in": len(jobs), "samples_written": w.written, "rejected": len(w.rejected), "out": str(ic.out),
               "patient_id_fallbacks": len(fallbacks)}
    return summary
