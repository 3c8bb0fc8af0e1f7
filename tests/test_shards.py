"""The shard contract: DALI-compatible index, manifest, determinism, third-party readers."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_shards.format import FORMAT_VERSION
from data_shards.tar_io import ShardError, safe_member_name, sha256_file

from .conftest import synth_dataset


def test_index_equals_dali_wds2idx(cohort, tmp_path):
    m = json.loads((cohort / "manifest.json").read_text())
    wds2idx = Path(sys.executable).parent / "wds2idx"
    assert wds2idx.exists(), "DALI's wds2idx tool is missing from the venv"
    for sh in m["shards"]:
        theirs = tmp_path / (sh["name"] + ".idx")
        subprocess.run([str(wds2idx), str(cohort / sh["name"]), str(theirs)], check=True, capture_output=True)
        assert (cohort / sh["index"]).read_bytes() == theirs.read_bytes(), sh["name"]


def test_manifest_contract(cohort):
    m = json.loads((cohort / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION and m["label_set"] == "ctrate18"
    assert m["preprocessing"]["stored_shape"] == [16, 40, 40]
    assert sum(s["samples"] for s in m["shards"]) == m["num_samples"] == 12
    patients = [p for sp in m["splits"].values() for p in sp["patients"]]
    assert len(patients) == len(set(patients)) == 12  # no patient in two splits
    assert set(m["splits"]) == {"train", "val", "test"}
    for sh in m["shards"]:
        assert sh["sha256"] == sha256_file(cohort / sh["name"])
        assert sh["bytes"] == (cohort / sh["name"]).stat().st_size
        assert sh["samples"] <= 3 and sh["name"].startswith(sh["split"] + "-")
    assert not list(cohort.glob("*.partial"))


def test_same_seed_same_bytes(tmp_path):
    a = synth_dataset(tmp_path / "a", patients=5, seed=3)
    b = synth_dataset(tmp_path / "b", patients=5, seed=3)
    c = synth_dataset(tmp_path / "c", patients=5, seed=4)
    sha = lambda d: [s["sha256"] for s in json.loads((d / "manifest.json").read_text())["shards"]]  # noqa: E731
    assert sha(a) == sha(b)
    assert sha(a) != sha(c)


def test_webdataset_library_reads_our_shards(cohort):
    import webdataset as wds

    from data_shards.sample import decode_members

    m = json.loads((cohort / "manifest.json").read_text())
    urls = [str(cohort / s["name"]) for s in m["shards"]]
    keys = []
    for rec in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        members = {k: v for k, v in rec.items() if not k.startswith("__")}
        s = decode_members(rec["__key__"], members)
        assert s.volume.shape == (16, 40, 40) and s.volume.dtype == np.int16
        keys.append(rec["__key__"])
    assert sorted(keys) == sorted(k for s in m["shards"] for k in s["keys"])


def test_dali_cpu_pipeline_decodes_npy_shards(tmp_path):
    """DALI's own webdataset reader + numpy decoder (CPU-only pipeline) on our shards and index."""
    from nvidia.dali import fn, pipeline_def

    from data_shards.sample import decode_members
    from data_shards.tar_io import read_index, read_sample_members

    root = synth_dataset(tmp_path / "d", codec="npy", patients=4, max_samples=8)
    m = json.loads((root / "manifest.json").read_text())
    sh = next(s for s in m["shards"] if s["samples"] >= 2)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        vol, txt = fn.readers.webdataset(paths=[str(root / sh["name"])], index_paths=[str(root / sh["index"])],
                                         ext=["vol.npy", "txt"], missing_component_behavior="error",
                                         random_shuffle=False, name="r")
        return fn.decoders.numpy(vol), txt

    p = pipe()
    p.build()
    entries = read_index(root / sh["index"])
    with open(root / sh["name"], "rb") as f:
        for e in entries:
            vol, txt = p.run()
            ours = decode_members(e.key, read_sample_members(f, e))
            got = np.array(vol.at(0))
            assert got.dtype == np.int16 and got.tobytes() == ours.volume.tobytes()
            assert bytes(np.array(txt.at(0))).decode() == ours.report


@pytest.mark.parametrize("name", ["../evil.npy", "/etc/passwd", "a/b.txt", "..", "", "x\\y.txt"])
def test_unsafe_member_names_rejected(name):
    with pytest.raises(ShardError, match="unsafe"):
        safe_member_name(name)


def test_reader_refuses_escaping_tar_member(tmp_path):
    import io
    import tarfile

    from data_shards.tar_io import iter_tar_samples

    p = tmp_path / "evil.tar"
    with tarfile.open(p, "w") as t:
        info = tarfile.TarInfo("../../outside.txt")
        info.size = 2
        t.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(ShardError, match="unsafe"):
        list(iter_tar_samples(p))
    assert not (tmp_path.parent.parent / "outside.txt").exists()


def test_incomplete_dataset_is_not_readable(cohort, tmp_path):
    from ctvlp_dist.data import ShardIndex

    d = tmp_path / "copy"
    shutil.copytree(cohort, d)
    (d / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        ShardIndex(d)
