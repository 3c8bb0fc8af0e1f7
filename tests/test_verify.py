"""`ctvlp verify` detects each kind of damage and names the shard and the sample."""
import io
import json
import shutil
import subprocess
import sys
import tarfile

import pytest

from data_shards.tar_io import read_index, sha256_file
from data_shards.verify import verify_dataset


@pytest.fixture
def ds(cohort_npy, tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(cohort_npy, d)
    m = json.loads((d / "manifest.json").read_text())
    sh = next(s for s in m["shards"] if s["samples"] >= 3)
    return d, m, sh


def _cli(d):
    r = subprocess.run([sys.executable, "-m", "ctvlp_dist", "verify", str(d), "--quiet"], capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stdout


def test_clean_dataset_passes(ds):
    d, m, _ = ds
    rc, out = _cli(d)
    assert rc == 0 and out.strip().endswith("OK") and f"{m['num_samples']} samples" in out


def test_corrupt_tar_header(ds):
    d, _, sh = ds
    entries = read_index(d / sh["index"])
    hdr = entries[1].members[0][1] - 512  # header of the second sample's first member
    raw = bytearray((d / sh["name"]).read_bytes())
    raw[hdr:hdr + 100] = b"\xff" * 100
    (d / sh["name"]).write_bytes(bytes(raw))
    rc, out = _cli(d)
    assert rc == 1
    assert f"{sh['name']}: corrupt tar header at byte {hdr} after member {entries[0].members[-1][3]}" in out


def test_truncated_member(ds):
    d, _, sh = ds
    e = read_index(d / sh["index"])[1]
    ext, off, size, name = e.members[0]
    with open(d / sh["name"], "r+b") as f:
        f.truncate(off + size // 2)
    res = verify_dataset(d)
    assert not res.ok
    assert any(f"{sh['name']}: sample {e.key}: member {name} truncated" in p for p in res.problems), res.problems
    assert any("size" in p and "truncated or replaced" in p for p in res.problems)


def test_bad_checksum(ds):
    d, _, sh = ds
    e = read_index(d / sh["index"])[0]
    _, off, size, _ = e.members[0]
    raw = bytearray((d / sh["name"]).read_bytes())
    raw[off + size - 1] ^= 0x01  # one bit of one voxel: the tar and the npy stay valid
    (d / sh["name"]).write_bytes(bytes(raw))
    res = verify_dataset(d)
    assert [p.split(" (")[0] for p in res.problems] == [f"{sh['name']}: sha256 checksum mismatch"]


def test_missing_report(ds):
    """Rebuild one shard without one sample's report, with a matching manifest and index, so
    the missing member is the only fault."""
    from data_shards.tar_io import TarShardWriter, iter_tar_samples

    d, m, sh = ds
    victim = sh["keys"][1]
    samples = list(iter_tar_samples(d / sh["name"]))
    w = TarShardWriter(d / sh["name"])
    for key, members in samples:
        w.add_sample(key, [(ext, data) for ext, data in members.items() if not (key == victim and ext == "txt")])
    info = w.close()
    sh.update(bytes=info["bytes"], sha256=info["sha256"])
    (d / "manifest.json").write_text(json.dumps(m))
    assert sha256_file(d / sh["name"]) == sh["sha256"]
    rc, out = _cli(d)
    assert rc == 1
    assert f"{sh['name']}: sample {victim}: no report ({victim}.txt)" in out
    assert out.count("  - ") == 1


def test_missing_shard_and_count_mismatch(ds):
    d, m, sh = ds
    (d / sh["name"]).unlink()
    res = verify_dataset(d)
    assert f"{sh['name']}: missing shard file" in res.problems


def test_unsafe_member_in_shard(ds):
    d, m, sh = ds
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    (d / sh["name"]).write_bytes(buf.getvalue())
    res = verify_dataset(d)
    assert any("unsafe tar member name '../escape.txt'" in p for p in res.problems)


def test_index_that_disagrees_with_the_tar(ds):
    d, _, sh = ds
    idx = d / sh["index"]
    lines = idx.read_text().splitlines()
    tok = lines[1].split(" ")
    tok[1] = str(int(tok[1]) + 512)  # first member's data offset, one block off
    idx.write_text("\n".join([lines[0], " ".join(tok), *lines[2:]]) + "\n")
    res = verify_dataset(d)
    assert res.problems == [f"{sh['name']}: index {sh['index']} does not match the tar"]
