"""CPU loader over WebDataset CT shards: torch DataLoader, rank/worker split, exact resume.

Reads each sample by random access through the shard's index (the same DALI index the
GPU reader uses): a 10-30 MB CT volume is one contiguous read, so random access costs
nothing over streaming, and it buys a true global shuffle per (seed, epoch), exactly-once
coverage across ranks and workers, and resume at any batch without replaying data.
"""
from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_shards.sample import decode_members
from data_shards.tar_io import read_index, read_sample_members
from data_shards.writer import load_manifest

from .batch import CTBatch
from .labels import LabelTable, OrganTexts
from .plan import rank_batches
from .text import check_text_view, text_view
from .transforms import TEXT, crop_pair, random_flip, sample_rng, window_into


# Shards kept mapped at once (the oldest map goes once no sample still views it). A mapped
# shard's pages also count in the resident set once read: `_make` lets a sample's pages go as soon
# as its batch holds the copies (embedding 240 scans had grown the resident set 35 MB more than 60).
OPEN_SHARDS = 8


class ShardIndex:
    """All samples of one split: (shard path, index entry), in manifest order."""

    def __init__(self, root: str | Path, split: Optional[str] = "train"):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        self.entries = []
        for sh in self.manifest["shards"]:
            if split is not None and sh["split"] != split:
                continue
            path = self.root / sh["name"]
            for e in read_index(self.root / sh["index"]):
                self.entries.append((str(path), e))
        if not self.entries and split is not None:
            have = sorted({s["split"] for s in self.manifest["shards"]})
            raise ValueError(f"{root}: no samples in split {split!r}; splits present: {have}")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def keys(self) -> list[str]:
        return [e.key for _, e in self.entries]


class _EpochDataset(IterableDataset):
    """Yields whole batches; batch j of the plan goes to worker (j - start) % num_workers,
    which is the order torch's DataLoader collects them in, so output order never depends
    on the worker count."""

    def __init__(self, index: ShardIndex, cfg, join, anatomies: tuple[str, ...] = ()):
        self.index, self.cfg, self.join, self.anatomies = index, cfg, join, anatomies
        self.batches: list = []
        self.start = 0
        self.epoch = 0
        self._files: dict = {}
        self._opening = threading.Lock()  # worker threads share the maps

    def __getstate__(self):  # worker processes get their own maps and lock
        return {**self.__dict__, "_files": {}, "_opening": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _opening=threading.Lock())

    def _read(self, sid: int):
        """Decode one sample from the mmapped shard: volume and mask are zero-copy views (npy)."""
        path, entry = self.index.entries[sid]
        mv = self._files.get(path)
        if mv is None:
            with self._opening:
                mv = self._files.get(path)
                if mv is None:
                    with open(path, "rb") as f:
                        mv = self._files[path] = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
                    while len(self._files) > OPEN_SHARDS:  # the oldest map goes once no sample still views it
                        self._files.pop(next(iter(self._files)))
        return decode_members(entry.key, read_sample_members(mv, entry), decode_mask=True)

    def _release(self, sid: int) -> None:
        """The batch holds copies now: drop the sample's shard pages from this process's resident
        set (the page cache keeps them), so memory does not grow with the shards read."""
        path, entry = self.index.entries[sid]
        mv = self._files.get(path)
        if mv is None:
            return
        start = min(o for _, o, _, _ in entry.members) // mmap.PAGESIZE * mmap.PAGESIZE
        end = max(o + n for _, o, n, _ in entry.members)
        try:
            mv.obj.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (ValueError, OSError):  # a map already let go
            pass

    def _make(self, items) -> CTBatch:
        c = self.cfg
        samples = [self._read(sid) for sid, _, _ in items]
        shape = tuple(samples[0].volume.shape) if c.raw else tuple(c.crop)
        with_mask = all(s.mask is not None for s in samples)
        vol = _alloc((len(items), 1, *shape), torch.int16 if c.raw else torch.float32)
        anat = _alloc((len(items), 1, *shape), torch.uint8) if with_mask else None
        for i, s in enumerate(samples):
            v, m = s.volume, s.mask
            if c.raw:
                if tuple(v.shape) != shape:
                    raise ValueError(f"sample {s.key}: shape {v.shape} differs from {shape} in one raw batch")
                np.copyto(vol[i, 0].numpy(), v)
            else:
                rng = sample_rng(c.seed, self.epoch, s.key)
                v, m = crop_pair(v, m, c.crop, rng if c.train else None, s.meta.get("pad_value", -1024))
                if c.train and c.flip_prob > 0:
                    v, m = random_flip(v, m, c.flip_axes, c.flip_prob, rng)
                window_into(vol[i, 0], v, c.hu_window, c.out_range)
            if with_mask:
                np.copyto(anat[i, 0].numpy(), m)
                if self.anatomies and not c.raw and not c.train:  # evaluation's 90% rule; not the training path
                    s.meta["mask_inside"] = mask_inside(np.bincount(s.mask.ravel(), minlength=256), m,
                                                        s.meta.get("mask_labels", {}), self.anatomies)
        keys = [s.key for s in samples]
        reports = [s.report for s in samples]
        if c.train and c.text_view != "report":
            reports = [text_view(r, c.text_view, sample_rng(c.seed, self.epoch, k, TEXT)) for r, k in zip(reports, keys)]
        labels, organ_text, organ_normal = self.join(keys)
        metas = [x.meta for x in samples]
        del samples  # the zero-copy views into the shards
        for sid, _, _ in items:
            self._release(sid)
        return CTBatch(volume=vol, report=reports, key=keys, anatomy=anat, labels=labels,
                       is_pad=torch.tensor([p for _, _, p in items], dtype=torch.bool), meta=metas,
                       organ_text=organ_text, organ_normal=organ_normal)

    def _close(self) -> None:
        for mv in self._files.values():
            try:
                mv.obj.close()
                mv.release()
            except BufferError:  # a caller still holds a view; the map closes when it is dropped
                pass
        self._files.clear()

    def __iter__(self) -> Iterator[CTBatch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        try:
            for j in range(self.start, len(self.batches)):
                if (j - self.start) % nw == wid:
                    yield self._make(self.batches[j])
        finally:
            self._close()


class KeyJoin:
    """keys -> (labels [B, K] or None, organ texts or None, organ normal flags [B, K] or None): what
    both loaders join to a batch by key (loader.labels, loader.organ_texts)."""

    def __init__(self, index: ShardIndex, cfg, label_names: Optional[list[str]], anatomies):
        self.labels = self.organs = None
        if cfg.labels:
            if label_names is None:
                from data_shards.label_sets import load_label_set

                label_names = load_label_set(index.manifest.get("label_set", "ctrate18")).names
            self.labels = LabelTable.from_file(cfg.labels, label_names)
        if cfg.organ_texts:
            if not anatomies:
                raise ValueError("loader.organ_texts needs the organs: set model.anatomies (e.g. [lung, heart, "
                                 "aorta, esophagus])")
            self.organs = OrganTexts(cfg.organ_texts, anatomies)

    def __call__(self, keys: list[str]):
        y = torch.from_numpy(self.labels.lookup(keys)) if self.labels is not None else None
        if self.organs is None:
            return y, None, None
        text, normal = self.organs.lookup(keys)
        return y, text, torch.from_numpy(normal)


def mask_inside(full_counts: np.ndarray, crop: np.ndarray, labels: dict, anatomies) -> dict:
    """Per organ, the share of its voxels that the crop kept (fVLM skips organs under 90% in
    evaluation); None for an organ the stored mask does not hold. `full_counts`: voxels per
    label value of the whole stored mask."""
    n_crop = np.bincount(np.asarray(crop).ravel(), minlength=256)
    out = {}
    for a in anatomies:
        v = labels.get(a)
        out[a] = None if v is None or full_counts[v] == 0 else float(n_crop[v] / full_counts[v])
    return out


def read_sample(path: str, entry):
    """One sample through its index entry, read from the shard file (no mmap kept)."""
    with open(path, "rb") as f:
        return decode_members(entry.key, read_sample_members(f, entry), decode_mask=True)


def _alloc(shape, dtype) -> torch.Tensor:
    """Batch buffers are born in shared memory inside loader workers, so handing a batch to
    the main process moves a file descriptor instead of copying tens of MB per batch. They are
    allocated there directly, as torch's default_collate does: `empty().share_memory_()` would
    touch and copy a private buffer first (it made a worker's batch 2.5x slower at 96x192x192)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    n = int(np.prod(shape))
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(n)
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def worker_init(_):
    os.environ["OMP_NUM_THREADS"] = "1"  # a loaded 2-core box slows 30x with torch's default threads
    torch.set_num_threads(1)


class CTLoader:
    """Iterate batches of one split for this rank. Stateful: `state_dict()` records the epoch
    and the batches already handed out; after `load_state_dict()` the next pass yields exactly
    the rest of that epoch, in the same order. A completed pass advances the epoch."""

    def __init__(self, root: str | Path, cfg, split: Optional[str] = "train", rank: int = 0, world_size: int = 1,
                 label_names: Optional[list[str]] = None, anatomies: Optional[list[str]] = None):
        """`anatomies` (fVLM's model.anatomies): in evaluation (loader.train=false) each sample's meta
        gets `mask_inside` (the share of each organ the centre crop kept); with loader.organ_texts
        the batch gets organ texts."""
        check_text_view(cfg.text_view)  # at construction, not in a worker's first batch
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.index = ShardIndex(root, split)
        self.dataset = _EpochDataset(self.index, cfg, KeyJoin(self.index, cfg, label_names, anatomies),
                                     tuple(anatomies or ()))
        self.epoch = 0
        self.consumed = 0

    def plan(self, epoch: Optional[int] = None):
        c = self.cfg
        return rank_batches(len(self.index), seed=c.seed, epoch=self.epoch if epoch is None else epoch,
                            shuffle=c.shuffle, rank=self.rank, world=self.world, batch_size=c.batch_size,
                            last_batch=c.last_batch)

    def __len__(self) -> int:
        return len(self.plan())

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def __iter__(self) -> Iterator[CTBatch]:
        batches = self.plan()
        if self.consumed >= len(batches):  # finished epoch not yet advanced (e.g. restored at its end)
            self.epoch, self.consumed = self.epoch + 1, 0
            batches = self.plan()
        ds = self.dataset
        ds.batches, ds.start, ds.epoch = batches, self.consumed, self.epoch
        for batch in self._threads(ds) if self.cfg.worker_type == "thread" else self._processes(ds):
            self.consumed += 1
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0

    def _processes(self, ds: _EpochDataset) -> Iterator[CTBatch]:
        nw = self.cfg.num_workers
        # A private generator: starting an iterator draws its base seed from it, not from the global
        # torch RNG that the model's dropout uses, so a run resumed mid-epoch (a fresh iterator) draws
        # the same dropout masks as the uninterrupted run.
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch * 101 + self.rank)
        yield from DataLoader(ds, batch_size=None, num_workers=nw, worker_init_fn=worker_init if nw else None,
                              prefetch_factor=self.cfg.prefetch_factor if nw else None, persistent_workers=False,
                              generator=gen)

    def _threads(self, ds: _EpochDataset) -> Iterator[CTBatch]:
        """Worker threads build whole batches, handed out in plan order. The copies and the window
        release the GIL, and a batch lives in this process's memory, which the allocator recycles
        warm; a worker process must give each batch fresh shared memory, whose first touch cost
        more than the decoding itself (benchmarks/README.md, "Data path")."""
        from concurrent.futures import ThreadPoolExecutor

        nw = self.cfg.num_workers
        todo = ds.batches[ds.start:]
        if nw == 0:
            try:
                yield from (ds._make(b) for b in todo)
            finally:
                ds._close()
            return
        ahead = nw * max(1, self.cfg.prefetch_factor)
        pool = ThreadPoolExecutor(nw, thread_name_prefix="ctvlp-loader")
        try:
            pending = [pool.submit(ds._make, b) for b in todo[:ahead]]
            for j in range(len(todo)):
                if j + ahead < len(todo):
                    pending.append(pool.submit(ds._make, todo[j + ahead]))
                batch, pending[j] = pending[j].result(), None
                yield batch
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # no thread reads a shard after it closes
            ds._close()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.consumed, "seed": self.cfg.seed,
                "num_samples": len(self.index), "world_size": self.world, "rank": self.rank,
                "batch_size": self.cfg.batch_size, "shuffle": self.cfg.shuffle, "last_batch": self.cfg.last_batch}

    def load_state_dict(self, sd: dict) -> None:
        for k in ("seed", "num_samples", "world_size", "batch_size", "shuffle", "last_batch"):
            mine = self.state_dict()[k]
            if sd.get(k) != mine:
                raise ValueError(f"loader state was saved with {k}={sd.get(k)!r} but this loader has {mine!r}; "
                                 f"the position cannot be restored exactly")
        self.epoch, self.consumed = int(sd["epoch"]), int(sd["batches_consumed"])
