"""Ingest on real data: the real example CT (NIfTI) and pydicom's real CT slice (DICOM)."""
import copy
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from ctvlp_dist.data import CTLoader
from data_shards.ingest.pipeline import run_ingest

from .conftest import make_cfg


def _reports(path: Path, names, text="Findings: Lungs are clear.\nImpression: Normal."):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", "Findings_EN", "Impressions_EN"])
        for n in names:
            fnd, imp = (text.split("\n") + [""])[:2] if text else ("", "")
            w.writerow([n, fnd, imp])
    return path


def _ingest(tmp, images, reports, **pre):
    cfg = make_cfg(ingest=dict(images=str(images), reports=str(reports), out=str(tmp / "out"), workers=1),
                   preprocess=pre or {})
    return run_ingest(cfg, progress=False), tmp / "out"


def _load_all(root):
    cfg = make_cfg(loader=dict(raw=True, shuffle=False, batch_size=1, num_workers=0))
    out = {}
    for b in CTLoader(root, cfg.loader, split=None):
        out[b.key[0]] = (b.volume[0, 0].numpy(), b.meta[0])
    return out


def _ras_dhw(img):
    can = nib.as_closest_canonical(img)
    return np.transpose(np.asarray(can.dataobj), (2, 1, 0)), can.header.get_zooms()[:3]


def test_example_ct_native_spacing_is_lossless(shared_data, tmp_path):
    img = nib.load(shared_data / "example_ct.nii.gz")
    ref, zooms = _ras_dhw(img)  # (S, A, R)
    (tmp_path / "img").mkdir()
    shutil.copy(shared_data / "example_ct.nii.gz", tmp_path / "img" / "train_7_a_1.nii.gz")
    s, out = _ingest(tmp_path, tmp_path / "img", _reports(tmp_path / "r.csv", ["train_7_a_1.nii.gz"]),
                     spacing=(3.0, 3.0, 3.0), stored_shape=(120, 104, 124))
    assert s == {"cases_in": 1, "samples_written": 1, "rejected": 0, "out": str(out), "patient_id_fallbacks": 0}
    vol, meta = _load_all(out)["train_7_a_1"]
    assert meta["orientation"] == "RAS" and meta["axes"] == ["S", "A", "R"]
    assert meta["spacing"] == [3.0, 3.0, 3.0] and np.allclose(meta["source_spacing"], zooms[::-1])
    assert meta["patient_id"] == "train_7" and not meta["rescale_applied"]
    off = meta["crop_offset"]
    inner = vol[off[0]:off[0] + ref.shape[0], off[1]:off[1] + ref.shape[1], off[2]:off[2] + ref.shape[2]]
    assert np.array_equal(inner, ref.astype(np.int16))  # orientation + HU preserved voxel for voxel
    assert (inner.min(), inner.max()) == (-1207, 3382)
    assert (vol == -1024).sum() >= vol.size - ref.size  # the rest is air padding


def test_example_ct_resampled_keeps_hu_range_and_orientation(shared_data, tmp_path):
    img = nib.load(shared_data / "example_ct.nii.gz")
    (tmp_path / "img").mkdir()
    # Same image stored LPS (x and y flipped): ingest must give the same RAS volume.
    data = np.asarray(img.dataobj)
    aff = img.affine.copy()
    lps = data[::-1, ::-1, :]
    aff2 = aff @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, -1, 0, data.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    nib.save(img, tmp_path / "img" / "a_1_a_1.nii.gz")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(lps), aff2), tmp_path / "img" / "b_2_a_1.nii.gz")
    assert nib.aff2axcodes(aff2) == ("L", "P", "S")
    s, out = _ingest(tmp_path, tmp_path / "img", _reports(tmp_path / "r.csv", ["a_1_a_1.nii.gz", "b_2_a_1.nii.gz"]))
    assert s["samples_written"] == 2
    got = _load_all(out)
    (va, ma), (vb, _) = got["a_1_a_1"], got["b_2_a_1"]
    assert np.array_equal(va, vb)
    assert va.shape == (120, 240, 240) and ma["spacing"] == [3.0, 1.5, 1.5]
    assert ma["source_shape"] == [112, 101, 122]
    body = va[va != -1024]
    assert body.min() >= -1207 and body.max() <= 3382  # interpolation never leaves the source range
    src = data.astype(float)
    assert abs(np.percentile(body, 1) - np.percentile(src, 1)) < 60
    assert abs(np.median(body) - np.median(src)) < 60
    # Bone is posterior (low A index) and the table-side air is... the spine lies near the midline in R.
    bone = np.argwhere(va > 300)
    assert abs(bone[:, 2].mean() - 120) < 30


def test_rescale_applied_exactly_once(shared_data, tmp_path):
    """CT-RATE v2 bug: data already in HU plus metadata intercept -1024 must not be rescaled again;
    raw stored values (HU + 1024) with the same metadata must be."""
    img = nib.load(shared_data / "example_ct.nii.gz")
    hu = np.asarray(img.dataobj).astype(np.int16)
    (tmp_path / "img").mkdir()
    nib.save(nib.Nifti1Image(hu, img.affine), tmp_path / "img" / "hu_1_a_1.nii.gz")
    nib.save(nib.Nifti1Image((hu.astype(np.int32) + 1024).astype(np.int16), img.affine), tmp_path / "img" / "raw_1_a_1.nii.gz")
    meta = tmp_path / "meta.csv"
    meta.write_text("VolumeName,RescaleIntercept,RescaleSlope\nhu_1_a_1.nii.gz,-1024,1\nraw_1_a_1.nii.gz,-1024,1\n")
    cfg = make_cfg(ingest=dict(images=str(tmp_path / "img"), out=str(tmp_path / "out"), metadata=str(meta), workers=1,
                               reports=str(_reports(tmp_path / "r.csv", ["hu_1_a_1.nii.gz", "raw_1_a_1.nii.gz"]))),
                   preprocess=dict(spacing=(3.0, 3.0, 3.0), stored_shape=(112, 101, 122)))
    run_ingest(cfg, progress=False)
    got = _load_all(tmp_path / "out")
    (vh, mh), (vr, mr) = got["hu_1_a_1"], got["raw_1_a_1"]
    assert not mh["rescale_applied"] and "already HU" in mh["rescale_reason"]
    assert mr["rescale_applied"]
    assert np.array_equal(vh, vr) and vh.min() == -1207


def _dicom_series(folder: Path, n=6, dz=5.0, modality_file="CT_small.dcm"):
    import pydicom
    import pydicom.data
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    src = pydicom.dcmread(pydicom.data.get_testdata_file(modality_file))
    base = src.pixel_array.astype(np.int16)
    order = np.random.default_rng(0).permutation(n)  # file names do not follow slice order
    for k in range(n):
        ds = copy.deepcopy(src)
        ds.ImagePositionPatient = [float(v) for v in src.ImagePositionPatient[:2]] + [float(src.ImagePositionPatient[2]) + k * dz]
        ds.InstanceNumber = k + 1
        ds.SOPInstanceUID = generate_uid()
        ds.PixelData = (base + 10 * k).astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{order[k]:04d}.dcm")
    return base


def test_dicom_series_ingest(tmp_path):
    base = _dicom_series(tmp_path / "img" / "ct_series_1")
    rep = tmp_path / "r.csv"
    _reports(rep, ["ct_series_1"])
    cfg = make_cfg(ingest=dict(images=str(tmp_path / "img"), reports=str(rep), out=str(tmp_path / "out"), workers=1),
                   preprocess=dict(spacing=(5.0, 0.661468, 0.661468), stored_shape=(6, 128, 128)))
    s = run_ingest(cfg, progress=False)
    assert s["samples_written"] == 1, json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    vol, meta = _load_all(tmp_path / "out")["ct_series_1"]
    assert meta["rescale_applied"] and meta["patient_id"] == "1CT1"
    # DICOM rows run posterior and columns run to the patient's left (LPS): RAS flips both.
    for k in range(6):
        expect = (base.astype(np.int32) + 10 * k - 1024)[::-1, ::-1]
        assert np.array_equal(vol[k], expect.astype(np.int16)), k
    assert vol.min() == base.min() - 1024


def test_unreadable_dicom_patient_id_is_listed_not_silent(tmp_path, caplog):
    """A DICOM series whose PatientID cannot be read (here: its first file's header is damaged)
    keeps the id from its file name, and says so: in ingest_report.json with the reason and the
    id it fell back to, in the summary's count and in the log. A wrong id can put one patient in
    two splits, so this must never pass in silence."""
    import logging

    _dicom_series(tmp_path / "img" / "ct_series_1", n=4)
    first = sorted((tmp_path / "img" / "ct_series_1").iterdir())[0]
    first.write_bytes(b"not a DICOM header" * 8)  # a damaged first file: the peek cannot read it
    _dicom_series(tmp_path / "img" / "ct_series_2", n=4)
    rep = tmp_path / "r.csv"
    _reports(rep, ["ct_series_1", "ct_series_2"])
    cfg = make_cfg(ingest=dict(images=str(tmp_path / "img"), reports=str(rep), out=str(tmp_path / "out"), workers=1),
                   preprocess=dict(spacing=(5.0, 2.0, 2.0), stored_shape=(4, 32, 32)))
    with caplog.at_level(logging.WARNING, logger="data_shards.ingest.pipeline"):
        s = run_ingest(cfg, progress=False)
    report = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    (note,) = report["patient_id_fallbacks"]
    assert note["case"] == "ct_series_1" and note["fell_back_to"] == "ct_series_1"
    assert note["reason"].startswith("PatientID unreadable (")
    assert s["patient_id_fallbacks"] == 1
    assert any("ct_series_1" in r.getMessage() and "file name" in r.getMessage() for r in caplog.records)


def test_bad_cases_are_counted_rejects(shared_data, tmp_path):
    img = nib.load(shared_data / "example_ct.nii.gz")
    d = tmp_path / "img"
    d.mkdir()
    small = np.asarray(img.dataobj)[::4, ::4, ::4].astype(np.float32)
    ok = lambda a, z=12.0: nib.Nifti1Image(a, np.diag([z, z, z, 1.0]))  # noqa: E731
    nib.save(ok(small), d / "good_1_a_1.nii.gz")
    (d / "corrupt_2_a_1.nii.gz").write_bytes(b"\x1f\x8b" + b"not really gzip" * 50)
    nan = small.copy()
    nan[2, 2, 2] = np.nan
    nib.save(ok(nan), d / "nan_3_a_1.nii.gz")
    nib.save(ok(np.clip(small, 0, 255)), d / "mrlike_4_a_1.nii.gz")  # no air: not CT intensities
    nib.save(ok(small, 0.01), d / "tiny_5_a_1.nii.gz")
    nib.save(ok(small), d / "noreport_6_a_1.nii.gz")
    nib.save(ok(small), d / "empty_7_a_1.nii.gz")
    _dicom_series(d / "mr_series_8", n=3, modality_file="MR_small.dcm")
    rep = tmp_path / "r.csv"
    with open(rep, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", "Findings_EN", "Impressions_EN"])
        for n in ["good_1_a_1", "corrupt_2_a_1", "nan_3_a_1", "mrlike_4_a_1", "tiny_5_a_1", "mr_series_8"]:
            w.writerow([n + (".nii.gz" if "series" not in n else ""), "Lungs clear.", "Normal."])
        w.writerow(["empty_7_a_1.nii.gz", "", ""])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ctvlp_dist", "shard", "--images", str(d), "--reports", str(rep), "--out", str(out),
           "--quiet", "preprocess.stored_shape=[8,16,16]", "preprocess.spacing=[12,12,12]", "ingest.workers=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "cases in: 8 = samples written: 1 + rejected: 7"
    rej = {x["case"]: x["reason"] for x in json.loads((out / "ingest_report.json").read_text())["rejects"]}
    assert "unreadable NIfTI" in rej["corrupt_2_a_1"]
    assert "NaN" in rej["nan_3_a_1"]
    assert "not a CT Hounsfield range" in rej["mrlike_4_a_1"]
    assert "absurd voxel spacing" in rej["tiny_5_a_1"]
    assert "no report" in rej["noreport_6_a_1"]
    assert "empty" in rej["empty_7_a_1"]
    assert "modality is MR" in rej["mr_series_8"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_samples"] == 1 and m["num_rejected"] == 7


def test_anatomy_mask_follows_the_volume(shared_data, tmp_path):
    """A mask in the image's own (LPS-stored) grid is reoriented and resampled (nearest) with it."""
    img = nib.load(shared_data / "example_ct.nii.gz")
    data = np.asarray(img.dataobj)
    lps = np.ascontiguousarray(data[::-1, ::-1, :])
    aff = img.affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, -1, 0, data.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    for d in ("img", "masks"):
        (tmp_path / d).mkdir()
    nib.save(nib.Nifti1Image(lps, aff), tmp_path / "img" / "m_1_a_1.nii.gz")
    nib.save(nib.Nifti1Image((lps > 300).astype(np.uint8) * 6, aff), tmp_path / "masks" / "m_1_a_1.nii.gz")
    cfg = make_cfg(ingest=dict(images=str(tmp_path / "img"), masks=str(tmp_path / "masks"), out=str(tmp_path / "out"),
                               reports=str(_reports(tmp_path / "r.csv", ["m_1_a_1.nii.gz"])), workers=1,
                               mask_source="labels"))
    assert run_ingest(cfg, progress=False)["samples_written"] == 1
    loader = CTLoader(tmp_path / "out", make_cfg(loader=dict(raw=True, batch_size=1, num_workers=0)).loader, split=None)
    b = next(iter(loader))
    vol, mask = b.volume[0, 0].numpy(), b.anatomy[0, 0].numpy()
    assert b.meta[0]["mask_labels"]["bone"] == 6 and set(np.unique(mask)) == {0, 6}
    bone = mask == 6
    assert bone.sum() > 1000
    assert np.median(vol[bone]) > 300 and np.median(vol[~bone & (vol > -2000)]) < 300
    assert (vol[bone] > 150).mean() > 0.95  # aligned: mask and volume went through the same geometry


def _ts_case(shape=(8, 6, 4)):
    """A hand-built TotalSegmentator v2 multi-label volume in (R, A, S) voxel order at 2 mm:
    each class in its own box, plus classes outside the map (liver 5, trachea 16)."""
    ml = np.zeros(shape, dtype=np.uint8)
    boxes = {10: (slice(0, 2), slice(0, 3), slice(0, 2)), 11: (slice(0, 2), slice(3, 6), slice(0, 2)),
             12: (slice(2, 4), slice(0, 2), slice(0, 4)), 13: (slice(2, 4), slice(2, 4), slice(0, 4)),
             14: (slice(2, 4), slice(4, 6), slice(0, 4)), 51: (slice(4, 6), slice(0, 3), slice(0, 4)),
             61: (slice(4, 6), slice(3, 4), slice(0, 4)), 15: (slice(6, 7), slice(0, 2), slice(0, 4)),
             5: (slice(6, 8), slice(4, 6), slice(0, 4)), 16: (slice(7, 8), slice(0, 2), slice(0, 4))}
    for v, box in boxes.items():
        ml[box] = v
    merged = np.zeros(shape, dtype=np.uint8)  # the expected fvlm4 merge, by hand
    for v, a in {10: 1, 11: 1, 12: 1, 13: 1, 14: 1, 51: 2, 61: 2, 15: 4}.items():
        merged[ml == v] = a
    return ml, merged


def test_totalsegmentator_masks_merge_and_resample(tmp_path):
    """fvlm4 on a hand-built label map, from the multi-label file and from per-class files: lobes
    -> lung, heart + left atrial appendage -> heart, esophagus; aorta absent (empty) in one case,
    esophagus's file missing in the other; both are kept and listed in ingest_report.json. The
    2 mm grid resampled to 1 mm with nearest neighbour equals each voxel repeated 2 x 2 x 2."""
    from data_shards.ingest.masks import load_anatomy_map, merge_multilabel
    from data_shards.label_sets import RESOURCES

    ml, merged = _ts_case()
    assert np.array_equal(merge_multilabel(ml, load_anatomy_map("fvlm4")), merged)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    for d in ("img", "masks"):
        (tmp_path / d).mkdir()
    rng = np.random.default_rng(0)
    for case in ("ml_1_a_1", "pc_2_a_1"):
        nib.save(nib.Nifti1Image(rng.integers(-1000, 400, ml.shape).astype(np.int16), aff),
                 tmp_path / "img" / f"{case}.nii.gz")
    nib.save(nib.Nifti1Image(ml, aff), tmp_path / "masks" / "ml_1_a_1.nii.gz")
    per_class = tmp_path / "masks" / "pc_2_a_1"
    per_class.mkdir()
    names = {10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left", 12: "lung_upper_lobe_right",
             13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right", 51: "heart", 61: "atrial_appendage_left",
             5: "liver", 16: "trachea"}
    for v, n in names.items():  # no esophagus.nii.gz: missing; aorta.nii.gz present but empty
        nib.save(nib.Nifti1Image((ml == v).astype(np.uint8), aff), per_class / f"{n}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros_like(ml), aff), per_class / "aorta.nii.gz")
    cfg = make_cfg(ingest=dict(images=str(tmp_path / "img"), masks=str(tmp_path / "masks"), out=str(tmp_path / "out"),
                               reports=str(_reports(tmp_path / "r.csv", ["ml_1_a_1.nii.gz", "pc_2_a_1.nii.gz"])),
                               workers=1),
                   preprocess=dict(spacing=(1.0, 1.0, 1.0), stored_shape=(8, 12, 16)))
    assert run_ingest(cfg, progress=False)["samples_written"] == 2
    loader = CTLoader(tmp_path / "out", make_cfg(loader=dict(raw=True, batch_size=1, num_workers=0,
                                                              shuffle=False)).loader, split=None)
    got = {b.key[0]: (b.anatomy[0, 0].numpy(), b.meta[0]) for b in loader}
    expect = np.transpose(merged, (2, 1, 0)).repeat(2, 0).repeat(2, 1).repeat(2, 2)  # (S, A, R) at 1 mm
    without_esophagus = np.where(expect == 4, 0, expect)
    for key, want in (("ml_1_a_1", expect), ("pc_2_a_1", without_esophagus)):
        mask, meta = got[key]
        assert meta["mask_labels"] == {"lung": 1, "heart": 2, "aorta": 3, "esophagus": 4}
        assert mask.shape == want.shape and np.array_equal(mask, want), key
    report = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert sorted(report["mask_gaps"], key=lambda g: g["case"]) == [
        {"case": "ml_1_a_1", "missing": [], "empty": ["aorta"]},
        {"case": "pc_2_a_1", "missing": ["esophagus"], "empty": ["aorta"]}]
    assert report["mask_gap_counts"] == {"aorta": {"missing": 0, "empty": 2}, "esophagus": {"missing": 1, "empty": 0}}
    assert (RESOURCES / "anatomy" / "fvlm4.yaml").exists()


def test_anatomy_map_errors_name_the_fix(tmp_path):
    import pytest

    from data_shards.ingest.masks import load_anatomy_map

    with pytest.raises(FileNotFoundError, match="shipped maps: \\['fvlm4'\\]"):
        load_anatomy_map("nope")
    bad = tmp_path / "m.yaml"
    bad.write_text("anatomies:\n  lung: [lung_upper_lobe]\n")
    with pytest.raises(ValueError, match="not TotalSegmentator v2"):
        load_anatomy_map(str(bad))
