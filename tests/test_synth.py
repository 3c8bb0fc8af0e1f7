"""The synthetic cohort: deterministic, realistic statistics, and every finding visible."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from data_shards.label_sets import load_label_set
from data_shards.format import ANATOMY_LABELS
from data_shards.synth.cohort import ScanJob, patient_labels, render_scan

NAMES = load_label_set("ctrate18").names
DEMO = dict(shape=(48, 96, 96), spacing=(6.0, 3.5, 3.5))  # the coarsest grid we ship (make demo)
LUNG_FINDINGS = {"Emphysema", "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela",
                 "Mosaic attenuation pattern", "Consolidation", "Interlobular septal thickening",
                 "Peribronchial thickening", "Bronchiectasis", "Pleural effusion"}


def _render(patient, labels, seed=0, **grid):
    g = {**DEMO, **grid}
    return render_scan(ScanJob(seed, patient, 0, g["shape"], g["spacing"], 12.0, only=labels))


def test_deterministic_per_seed():
    a = _render(5, None)
    b = _render(5, None)
    c = _render(5, None, seed=1)
    assert np.array_equal(a[0], b[0]) and a[3] == b[3]
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("finding", NAMES)
def test_every_finding_is_visible(finding):
    """Same patient, same noise, with and without the finding: the finding alone must change
    a clearly visible cluster of voxels (>= 10 voxels by >= 80 HU at demo resolution)."""
    off = {n: False for n in NAMES}
    for patient in (1, 2, 3):
        base_vol, base_mask, *_ = _render(patient, off)
        vol, *_ = _render(patient, {**off, finding: True})
        changed = np.abs(vol.astype(np.int32) - base_vol) >= 80
        assert changed.sum() >= 10, f"{finding} barely visible for patient {patient}: {changed.sum()} voxels"
        if finding in LUNG_FINDINGS:
            inside = (base_mask[changed] == ANATOMY_LABELS["lung"]).mean()
            assert inside > 0.85, f"{finding} drawn outside the lungs ({inside:.2f} inside)"


def test_anatomy_masks_and_hu():
    vol, mask, *_ = _render(0, {n: False for n in NAMES}, shape=(60, 120, 120), spacing=(6.0, 3.0, 3.0))
    mean = {k: vol[mask == v].mean() for k, v in ANATOMY_LABELS.items() if (mask == v).any()}
    assert set(mean) >= {"lung", "heart", "aorta", "esophagus"}
    assert -900 < mean["lung"] < -800
    assert 20 < mean["esophagus"] < 60 and 120 < mean["aorta"] < 180 and 40 < mean["heart"] < 160
    assert mean["bone"] > 250
    assert (vol < -950).mean() > 0.2  # air around the body


def test_prevalence_matches_ctrate():
    ls = load_label_set("ctrate18")
    n = 4000
    freq = np.mean([[patient_labels(0, i)[f.name] for f in ls.findings] for i in range(n)], axis=0)
    p = np.array([f.prevalence for f in ls.findings])
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-3), (freq, p)


def test_reports_follow_labels():
    off = {n: False for n in NAMES}
    _, _, _, normal, *_ = _render(4, off)
    assert normal.startswith("Findings: ") and "\nImpression: " in normal
    imp = normal.split("\nImpression: ")[1]
    assert "normal" in imp.lower() or "no significant" in imp.lower()
    _, _, _, allpos, *_ = _render(4, {n: True for n in NAMES})
    assert allpos.split("\nImpression: ")[1].count("•") == 18


def test_cohort_writes_ground_truth(cohort_npy):
    m = json.loads((cohort_npy / "manifest.json").read_text())
    rows = list(csv.DictReader(open(cohort_npy / "ground_truth.csv")))
    assert [r["AccessionNo"] for r in rows] == sorted(k for s in m["shards"] for k in s["keys"])
    assert list(rows[0])[2:] == NAMES
    for r in rows:
        pid = int(r["AccessionNo"].split("_")[1])
        assert {n: bool(int(r[n])) for n in NAMES} == patient_labels(0, pid)
    # two reconstructions of one patient stay in one split
    for sp in m["splits"].values():
        assert len(sp["patients"]) * 2 == sp["samples"]


def test_bounded_map_keeps_memory_flat():
    from data_shards.parallel import bounded_map

    pulled = []

    def items():
        for i in range(40):
            pulled.append(i)
            yield i

    for n_out, x in enumerate(bounded_map(abs, items(), workers=2, in_flight=3), 1):
        assert len(pulled) - n_out <= 3
        assert x == n_out - 1


@pytest.mark.slow
def test_raw_cohort_at_ctrate_geometry_through_ingest(tmp_path):
    """synth.raw writes NIfTI at CT-RATE spacings (half LPS) plus CT-RATE CSVs; ingest with the
    CT-RATE-style metadata must not rescale twice, and must give RAS volumes at the target grid."""
    import nibabel as nib

    raw = tmp_path / "raw"
    r = subprocess.run([sys.executable, "-m", "ctvlp_dist", "synth", "--out", str(raw), "--patients", "4", "--raw", "true",
                        "--quiet", "synth.raw_scale=0.12"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    files = sorted((raw / "volumes").glob("*.nii.gz"))
    assert len(files) == 4
    codes = {nib.aff2axcodes(nib.load(f).affine) for f in files}
    assert codes == {("R", "A", "S"), ("L", "P", "S")}
    for f in files:
        z = nib.load(f).header.get_zooms()
        assert 0.28 / 0.12 - 0.1 < z[0] < 1.0 / 0.12 + 0.1
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, "-m", "ctvlp_dist", "shard", "--images", str(raw / "volumes"), "--reports",
                        str(raw / "reports.csv"), "--metadata", str(raw / "metadata.csv"), "--out", str(out), "--quiet",
                        "preprocess.spacing=[6,6,6]", "preprocess.stored_shape=[40,48,48]"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "cases in: 4 = samples written: 4 + rejected: 0"
    from ctvlp_dist.data import CTLoader

    from .conftest import make_cfg

    cfg = make_cfg(loader=dict(raw=True, shuffle=False, batch_size=1, num_workers=0))
    for b in CTLoader(out, cfg.loader, split=None):
        assert not b.meta[0]["rescale_applied"]
        v = b.volume.float()
        lung = v[(v > -950) & (v < -750)]
        assert lung.numel() > 100 and -880 < lung.mean() < -820  # lung HU intact
        assert v.min() >= -1200  # a second rescale would shift air to about -2000
