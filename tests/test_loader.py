"""CPU loader: bit-exact round trip, exactly-once coverage across ranks x workers, exact resume."""
import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ctvlp_dist.config import LoaderConfig
from ctvlp_dist.data import CTLoader, rank_batches
from ctvlp_dist.data.transforms import crop_pair, random_flip, window_into
from data_shards.synth.cohort import ScanJob, patient_labels, render_scan

from .conftest import SMALL_SHAPE, SMALL_SPACING

ROOT = Path(__file__).resolve().parents[1]


def test_round_trip_bit_exact_int16(cohort):
    """Shards -> loader gives exactly the volumes and masks the generator renders, for both codecs."""
    cfg = LoaderConfig(raw=True, shuffle=True, batch_size=3, num_workers=2)
    n = 0
    for b in CTLoader(cohort, cfg, split=None):
        assert b.volume.dtype == torch.int16 and b.anatomy.dtype == torch.uint8
        for key, vol, mask, pad in zip(b.key, b.volume, b.anatomy, b.is_pad):
            if pad:
                continue
            pid, recon = int(key.split("_")[1]), int(key.split("_")[3]) - 1
            ref_vol, ref_mask, *_ = render_scan(ScanJob(0, pid, recon, SMALL_SHAPE, SMALL_SPACING, 12.0))
            assert vol[0].numpy().tobytes() == ref_vol.tobytes(), key
            assert np.array_equal(mask[0].numpy(), ref_mask), key
            n += 1
    assert n == 12


def test_batch_contract_and_label_join(cohort_npy):
    cfg = LoaderConfig(batch_size=4, num_workers=0, crop=(8, 16, 16), labels=str(cohort_npy / "ground_truth.csv"))
    loader = CTLoader(cohort_npy, cfg, split="train")
    b = next(iter(loader))
    assert b.volume.shape == (4, 1, 8, 16, 16) and b.volume.dtype == torch.float32
    assert float(b.volume.min()) >= -1.0 and float(b.volume.max()) <= 1.0
    assert b.anatomy.shape == (4, 1, 8, 16, 16) and b.labels.shape == (4, 18)
    assert len(b.report) == len(b.key) == 4 and all(r.startswith("Findings:") for r in b.report)
    for key, lab in zip(b.key, b.labels):
        truth = patient_labels(0, int(key.split("_")[1]))
        assert lab.tolist() == [float(v) for v in truth.values()]


def test_missing_labels_is_a_clear_error(cohort_npy, tmp_path):
    lines = (cohort_npy / "ground_truth.csv").read_text().splitlines()
    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join(lines[:3]) + "\n")
    cfg = LoaderConfig(batch_size=26, num_workers=0, crop=(8, 16, 16), labels=str(partial), last_batch="pad")
    with pytest.raises(KeyError, match="have no labels"):
        next(iter(CTLoader(cohort_npy, cfg, split=None)))


@pytest.mark.parametrize("n,world,bs,mode", [(13, 2, 2, "pad"), (13, 2, 2, "drop"), (7, 3, 4, "pad"), (100, 4, 3, "drop")])
def test_plan_exactly_once(n, world, bs, mode):
    seen = Counter()
    nb = None
    for r in range(world):
        bt = rank_batches(n, seed=1, epoch=2, shuffle=True, rank=r, world=world, batch_size=bs, last_batch=mode)
        assert nb is None or len(bt) == nb  # every rank steps the same number of times
        nb = len(bt)
        for batch in bt:
            assert len(batch) == bs
            seen.update(sid for sid, _, pad in batch if not pad)
    assert max(seen.values()) == 1
    if mode == "pad":
        assert set(seen) == set(range(n))
    else:
        assert len(seen) == (n // (world * bs)) * world * bs


def test_two_processes_two_workers_cover_each_sample_once(cohort_npy, tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "tests.loader_rank", str(cohort_npy), str(r), "2",
                               str(tmp_path / f"r{r}.json")], cwd=ROOT) for r in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    ranks = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    m = json.loads((cohort_npy / "manifest.json").read_text())
    train = sorted(k for s in m["shards"] if s["split"] == "train" for k in s["keys"])
    orders = []
    for epoch in range(2):
        real = Counter(k for rk in ranks for batch in rk[epoch] for k, pad in batch if not pad)
        assert sorted(real) == train and set(real.values()) == {1}, f"epoch {epoch}: {real}"
        assert len(ranks[0][epoch]) == len(ranks[1][epoch])
        orders.append([k for batch in ranks[0][epoch] for k, _ in batch])
    assert orders[0] != orders[1]  # reshuffled per epoch
    # same (seed, epoch) -> same order whatever the worker count
    cfg = LoaderConfig(batch_size=2, num_workers=0, seed=7, crop=(8, 16, 16))
    single = [k for b in CTLoader(cohort_npy, cfg, split="train", rank=0, world_size=2) for k in b.key]
    assert single == orders[0]


@pytest.mark.parametrize("stop_after,worker_type", [(1, "thread"), (3, "thread"), (3, "process")])
def test_mid_epoch_resume_yields_exactly_the_rest(cohort_npy, stop_after, worker_type):
    """2 worker threads or processes hand out exactly the batches of 0 workers, in order, and a
    fresh loader restored from the state continues them."""
    cfg = LoaderConfig(batch_size=2, num_workers=2, seed=3, crop=(8, 16, 16), worker_type=worker_type)
    full = [(b.key, b.volume.clone()) for b in CTLoader(cohort_npy, dataclasses.replace(cfg, num_workers=0), split="train")]
    first = CTLoader(cohort_npy, cfg, split="train")
    it = iter(first)
    head = [next(it) for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint would store
    del it
    resumed = CTLoader(cohort_npy, cfg, split="train")
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b.key for b in head] + [b.key for b in rest] == [k for k, _ in full]
    for b, (k, v) in zip(head + rest, full):
        assert torch.equal(b.volume, v)  # same crops and flips after the resume
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["batches_consumed"] == 0


def test_resume_refuses_a_different_setup(cohort_npy):
    cfg = LoaderConfig(batch_size=2, num_workers=0, crop=(8, 16, 16))
    sd = CTLoader(cohort_npy, cfg, split="train").state_dict()
    other = CTLoader(cohort_npy, dataclasses.replace(cfg, batch_size=4), split="train")
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(sd)


def test_hu_window_maps_seed_paper_range():
    v = np.array([-2000, -1000, -400, 200, 3000, -700], dtype=np.int16)[::-1]  # strided view
    out = window_into(torch.full((6,), float("nan")), v, (-1000, 200), (-1, 1))
    assert torch.allclose(out, torch.tensor([-0.5, 1, 1, 0, -1, -1]))


def test_crops_and_flips():
    rng = np.random.default_rng()
    vol = rng.integers(-1000, 1000, size=(10, 12, 14)).astype(np.int16)
    mask = (vol > 0).astype(np.uint8)
    c, m = crop_pair(vol, mask, (6, 8, 8), np.random.default_rng(5), -1024)
    hits = [(i, j, k) for i in range(5) for j in range(5) for k in range(7)
            if np.array_equal(vol[i:i + 6, j:j + 8, k:k + 8], c)]
    assert len(hits) == 1 and np.array_equal(m, mask[tuple(slice(a, a + s) for a, s in zip(hits[0], (6, 8, 8)))])
    # centre crop with padding where the volume is smaller (evaluation)
    c, m = crop_pair(vol, mask, (14, 8, 16), None, -1024)
    assert c.shape == (14, 8, 16)
    assert (c[:2] == -1024).all() and (c[-2:] == -1024).all() and (m[:2] == 0).all()
    assert np.array_equal(c[2:12, :, 1:15], vol[:, 2:10, :])
    f, fm = random_flip(vol, mask, (2,), 1.0, rng)
    assert np.array_equal(f, vol[:, :, ::-1]) and np.array_equal(fm, mask[:, :, ::-1])


def test_sentence_text_view_draws_one_sentence_per_sample_and_epoch(cohort_npy):
    from ctvlp_dist.labels.rules import split_sentences

    cfg = LoaderConfig(batch_size=4, num_workers=0, crop=(8, 16, 16), text_view="sentence")
    whole = next(iter(CTLoader(cohort_npy, dataclasses.replace(cfg, text_view="report"), split="train")))
    a = next(iter(CTLoader(cohort_npy, cfg, split="train")))
    b = next(iter(CTLoader(cohort_npy, cfg, split="train")))
    assert a.report == b.report and a.key == whole.key  # reproducible, same samples
    for sent, report in zip(a.report, whole.report):
        assert sent.rstrip(".") in split_sentences(report)
    loader, seen = CTLoader(cohort_npy, cfg, split="train"), {}
    for epoch in range(3):  # over the epochs a report's volume meets different sentences
        loader.set_epoch(epoch)
        for batch in loader:
            for k, t in zip(batch.key, batch.report):
                seen.setdefault(k, set()).add(t)
    assert max(len(v) for v in seen.values()) > 1
    evaluation = next(iter(CTLoader(cohort_npy, dataclasses.replace(cfg, train=False), split="train")))
    assert evaluation.report == whole.report  # evaluation always reads whole reports
    with pytest.raises(ValueError, match="text_view"):
        CTLoader(cohort_npy, dataclasses.replace(cfg, text_view="paragraph"), split="train")


def test_text_group_ids_equal_exactly_for_identical_texts():
    from ctvlp_dist.data.text import text_group_ids

    g = text_group_ids(["No pleural effusion.", "Cardiomegaly is present.", "No pleural effusion.", "no pleural effusion."])
    assert g.dtype == torch.int64 and g[0] == g[2] and len({int(x) for x in g}) == 3
    assert torch.equal(g, text_group_ids(["No pleural effusion.", "Cardiomegaly is present.", "No pleural effusion.",
                                          "no pleural effusion."]))  # stable: ranks hash alike


@pytest.mark.parametrize("num_workers,worker_type", [(0, "thread"), (2, "thread"), (2, "process")])
def test_starting_an_epoch_leaves_the_global_rng_alone(cohort_npy, num_workers, worker_type):
    """A run resumed mid-epoch starts a fresh iterator where the uninterrupted run did not: if that
    drew from torch's global RNG, the model's dropout masks (and losses) would differ after resume."""
    loader = CTLoader(cohort_npy, LoaderConfig(batch_size=2, num_workers=num_workers, crop=(8, 16, 16),
                                               worker_type=worker_type), split="train")
    torch.manual_seed(11)
    want = torch.rand(4)
    torch.manual_seed(11)
    it = iter(loader)
    next(it)
    it.close()
    assert torch.equal(torch.rand(4), want)
