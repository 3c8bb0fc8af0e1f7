"""The DALI loader (CPU-only DALI 2.4, the real pipeline): the torch loader is its reference, bit
for bit; augmentation depends on (seed, epoch, key) only; ranks cover an epoch as documented;
mid-epoch resume; a training run on DALI equals one on torch; damaged shards are named."""
import dataclasses
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from ctvlp_dist.config import LoaderConfig
from ctvlp_dist.data import CTLoader, build_loader
from ctvlp_dist.data.dali import DALILoader
from ctvlp_dist.data.transforms import crop_anchor, flip_draws, sample_rng
from data_shards.tar_io import ShardError

from .conftest import ROOT, metric_rows, run_ctvlp

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def by_key(loader, epochs=1) -> dict:
    """(epoch, key) -> everything a batch says of that sample (repeats left out)."""
    out = {}
    for e in range(epochs):
        for b in loader:
            for i, (k, pad) in enumerate(zip(b.key, b.is_pad.tolist())):
                if not pad:
                    assert (e, k) not in out, f"{k} twice in epoch {e}"
                    out[e, k] = (b.volume[i].clone(), None if b.anatomy is None else b.anatomy[i].clone(),
                                 b.report[i], None if b.labels is None else b.labels[i].clone(), b.meta[i])
    return out


@pytest.mark.parametrize("train", [False, True], ids=["centre", "augmented"])
def test_dali_equals_the_torch_loader_bit_for_bit(cohort, train):
    """Both codecs. Centre crops (augmentation off), then random crops with flips on all 3 axes
    over 2 epochs: the same key in the same epoch gives the same bytes from both backends. The
    crop pads H (40 -> 48) with air and cuts D and W; labels join by key; evaluation's per-organ
    share inside the crop agrees too."""
    cfg = LoaderConfig(batch_size=3, num_workers=1, crop=(12, 48, 32), shuffle=False, train=train,
                       flip_axes=(0, 1, 2), last_batch="pad", labels=str(cohort / "ground_truth.csv"))
    organs = ["lung", "heart", "aorta", "esophagus"]
    epochs = 2 if train else 1
    dali = by_key(DALILoader(cohort, cfg, split="train", anatomies=organs), epochs)
    ref = by_key(CTLoader(cohort, dataclasses.replace(cfg, num_workers=0), split="train", anatomies=organs), epochs)
    assert dali.keys() == ref.keys() and len(ref) == 10 * epochs
    for ek, (v, m, r, y, meta) in ref.items():
        dv, dm, dr, dy, dmeta = dali[ek]
        assert v.dtype == dv.dtype == torch.float32 and v.numpy().tobytes() == dv.numpy().tobytes(), ek
        assert m.numpy().tobytes() == dm.numpy().tobytes() and r == dr and torch.equal(y, dy), ek
        assert dmeta.get("mask_inside") == meta.get("mask_inside"), ek
    if train:  # the two epochs differ: the epoch is part of the draw
        assert sum(not torch.equal(ref[0, k][0], ref[1, k][0]) for _, k in ref) >= 8


def test_augmentation_depends_on_seed_epoch_and_key_only(cohort_npy):
    """One rank vs two ranks, with shuffling: each key gets the same crop and flips either way."""
    cfg = LoaderConfig(batch_size=2, num_workers=1, crop=(8, 24, 24), shuffle=True, flip_axes=(0, 2), last_batch="pad",
                       dali_shuffle_buffer=4)
    one = by_key(DALILoader(cohort_npy, cfg, split="train"), 2)
    two = {}
    for r in range(2):
        two.update(by_key(DALILoader(cohort_npy, cfg, split="train", rank=r, world_size=2), 2))
    assert one.keys() == two.keys() and len(one) == 2 * 22
    assert all(torch.equal(one[k][0], two[k][0]) and torch.equal(one[k][1], two[k][1]) for k in one)


def test_crop_and_flip_draws_are_uniform_and_in_range():
    """The draws both loaders use: anchors uniform over the valid starts (chi-square, fixed seed),
    an axis shorter than the crop centred with negative anchors, flips Bernoulli(p)."""
    from scipy.stats import chisquare

    shape, size, n = (16, 40, 30), (8, 32, 36), 4000
    anchors, flips = [], []
    for i in range(n):
        rng = sample_rng(7, 3, f"key_{i}")
        anchors.append(crop_anchor(shape, size, rng))
        flips.append(flip_draws((0, 2), 0.3, rng))
    a = np.array(anchors)
    assert a[:, 0].min() == 0 and a[:, 0].max() == 8 and a[:, 1].min() == 0 and a[:, 1].max() == 8
    assert (a[:, 2] == -3).all() and crop_anchor(shape, size, None) == [4, 4, -3]
    for ax in (0, 1):
        assert chisquare(np.bincount(a[:, ax], minlength=9)).pvalue > 1e-3
    f = np.array(flips)
    assert (f[:, 1] == 0).all() and all(abs(f[:, ax].mean() - 0.3) < 4 * np.sqrt(0.21 / n) for ax in (0, 2))


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_two_ranks_cover_each_epoch_as_documented(cohort_npy, shuffle):
    """Evaluation (pad): the real samples of 2 ranks are the split, once each, every epoch; both
    ranks run the same number of full batches; in order, each rank's samples are one contiguous
    DALI shard of the manifest order. Training (drop): no repeats, equal batch counts."""
    keys = CTLoader(cohort_npy, LoaderConfig(), split="train").index.keys  # manifest order, 22 samples
    cfg = LoaderConfig(batch_size=4, num_workers=1, crop=(8, 16, 16), shuffle=shuffle, last_batch="pad",
                       dali_shuffle_buffer=6)
    loaders = [DALILoader(cohort_npy, cfg, split="train", rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 3  # ceil(11 / 4)
    for epoch in range(3):
        seen = []
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == 3 and all(len(b) == 4 for b in batches)
            real = [k for b in batches for k, p in zip(b.key, b.is_pad.tolist()) if not p]
            pads = [k for b in batches for k, p in zip(b.key, b.is_pad.tolist()) if p]
            assert len(real) == 11 and len(pads) == 1 and pads[0] in real  # 11 + 1 repeat of its own
            if not shuffle:
                pos = [keys.index(k) for k in real]
                assert pos in (list(range(0, 11)), list(range(11, 22)))
            seen += real
        assert Counter(seen) == Counter(keys), epoch
    drop = dataclasses.replace(cfg, last_batch="drop")
    for r in range(2):
        got = [b for b in DALILoader(cohort_npy, drop, split="train", rank=r, world_size=2)]
        assert len(got) == 2 and not any(b.is_pad.any() for b in got)


def test_resume_mid_epoch_gives_the_remaining_batches(cohort):
    """Stop after 2 batches of epoch 1, save, restore in a fresh loader: the rest of epoch 1 and
    all of epoch 2 equal the uninterrupted run's, volumes (random crops) included."""
    cfg = LoaderConfig(batch_size=2, num_workers=1, crop=(8, 24, 24), shuffle=True, last_batch="drop",
                       dali_shuffle_buffer=4)
    full = DALILoader(cohort, cfg, split="train")
    ref = [(e, b.key, b.volume.clone()) for e in range(3) for b in full]
    first = DALILoader(cohort, cfg, split="train")
    list(first)
    it = iter(first)
    head = [next(it).key for _ in range(2)]
    it.close()
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == 2 and head == [k for _, k, _ in ref[5:7]]
    again = DALILoader(cohort, cfg, split="train")
    again.load_state_dict(state)
    rest = [(again.epoch, b.key, b.volume.clone()) for _ in range(2) for b in again]
    assert [(e, k) for e, k, _ in rest] == [(e, k) for e, k, _ in ref[7:]]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(rest, ref[7:]))
    with pytest.raises(ValueError, match="torch loader"):
        again.load_state_dict(CTLoader(cohort, cfg, split="train").state_dict())


def test_training_on_dali_reaches_the_torch_losses_and_resumes_mid_epoch(train_cohort, tmp_path):
    """The real loop (one local worker, ZeRO-0, shuffle off, drop-last). On DALI the run dies before
    step 3 (fault injection) and the same command resumes from step 2's checkpoint, mid-epoch: its 4
    losses equal the torch backend's uninterrupted run within 1e-6."""
    import subprocess
    import sys

    data, labels = train_cohort
    args = ["train", "--config", str(ROOT / "configs" / "train_tiny_cpu.yaml"), f"train.data={data}",
            f"loader.labels={labels}", "train.launcher=local", "train.workers=1", "train.zero_stage=0",
            "train.steps=4", "train.global_batch=2", "train.export=false", "train.ckpt_every=1",
            "loader.shuffle=false", "loader.num_workers=1", "--quiet"]
    run_ctvlp(*args, f"train.out={tmp_path / 'torch'}", "loader.backend=torch")
    dali = [*args, f"train.out={tmp_path / 'dali'}", "loader.backend=dali"]
    died = subprocess.run([sys.executable, "-m", "ctvlp_dist", *dali], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "CTVLP_TEST_FAIL_AT_STEP": "3"})
    assert died.returncode != 0 and [r["step"] for r in metric_rows(tmp_path / "dali")] == [1, 2], died.stderr[-2000:]
    run_ctvlp(*dali)
    rows = metric_rows(tmp_path / "dali")
    want = [r["loss"] for r in metric_rows(tmp_path / "torch")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and len(want) == 4
    assert np.allclose([r["loss"] for r in rows], want, rtol=0, atol=1e-6), (rows, want)


def test_truncated_shard_is_named_and_a_missing_member_is_counted(cohort_npy, tmp_path):
    from data_shards.tar_io import read_index, write_index

    bad = tmp_path / "bad"
    shutil.copytree(cohort_npy, bad)
    shard = sorted(bad.glob("train-*.tar"))[1]
    idx = read_index(shard.with_suffix(".idx"))
    with open(shard, "r+b") as f:
        f.truncate(idx[-1].members[0][1] + 100)  # inside the last sample's volume
    with pytest.raises(ShardError, match=f"{shard.name}: truncated .* sample {idx[-1].key}"):
        DALILoader(bad, LoaderConfig(crop=(8, 16, 16)), split="train")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(cohort_npy, corrupt)
    shard = sorted(corrupt.glob("train-*.tar"))[2]
    idx = read_index(shard.with_suffix(".idx"))
    with open(shard, "r+b") as f:  # a corrupt npy header: DALI's own error does not name the sample
        f.seek(idx[1].members[0][1])
        f.write(b"garbage!")
    for shuffle in (False, True):
        with pytest.raises(ShardError, match=f"{shard.name}: sample {idx[1].key}: cannot decode npy"):
            list(DALILoader(corrupt, LoaderConfig(crop=(8, 16, 16), shuffle=shuffle), split="train"))

    gone = tmp_path / "gone"
    shutil.copytree(cohort_npy, gone)
    shard = sorted(gone.glob("train-*.tar"))[0]
    idx = read_index(shard.with_suffix(".idx"))
    idx[0].members = [m for m in idx[0].members if m[0] != "txt"]  # the index no longer lists its report
    write_index(shard.with_suffix(".idx"), idx)
    loader = DALILoader(gone, LoaderConfig(batch_size=2, crop=(8, 16, 16), shuffle=False, train=False), split="train")
    assert loader.missing == {"txt": [idx[0].key]}
    b = next(iter(loader))
    assert b.key[0] == idx[0].key and b.report[0] == "" and b.report[1]


def test_build_loader_picks_the_backend(cohort_npy):
    from ctvlp_dist.config import config_from_dict
    from ctvlp_dist.data import resolve_backend

    gpu = torch.cuda.is_available()
    assert resolve_backend("auto") == (("dali", "gpu") if gpu else ("torch", "cpu"))
    assert resolve_backend("dali") == ("dali", "gpu" if gpu else "cpu")
    cfg = LoaderConfig(crop=(8, 16, 16))
    assert isinstance(build_loader(cohort_npy, dataclasses.replace(cfg, backend="dali")), DALILoader)
    assert isinstance(build_loader(cohort_npy, dataclasses.replace(cfg, backend="torch")), CTLoader)
    with pytest.raises(ValueError, match="backend"):
        config_from_dict({"loader": {"backend": "nvjpeg"}})
