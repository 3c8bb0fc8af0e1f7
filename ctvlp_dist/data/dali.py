"""NVIDIA DALI loader over the same WebDataset CT shards: `DALILoader` yields `CTBatch`.

Reader: `fn.readers.webdataset` over a split's shards and their DALI index files. DALI gives
rank r of S a *contiguous* range of the split in manifest order: DALI shard k is samples
[floor(n*k/S), floor(n*(k+1)/S)), and rank r reads shard (r + epoch) % S in each epoch (DALI
rotates shards across epochs unless it sticks to them; with `shuffle` it sticks: rank r always
reads shard r). `pad_last_batch` pads every shard to ceil(n/S) samples by repeating its last
one, so all ranks run the same number of batches:
- training (`last_batch=drop`, `LastBatchPolicy.DROP`): each rank takes the first
  floor(floor(n/S)/B) batches of its range; the rest of the range (< 1 batch + 1 sample) is
  read and dropped. No repeat ever reaches a training batch.
- evaluation (`last_batch=pad`, `LastBatchPolicy.FILL` on the padded reader): ceil(ceil(n/S)/B)
  full batches; the repeats fill the tail and are flagged in `batch.is_pad`. (PARTIAL would cut
  them, leaving ranks with last batches of unequal size, which an all_gather cannot take.)
The torch loader strides a global order across ranks instead (sample j goes to rank j % S).

Shuffle (`loader.shuffle`): `shuffle_after_epoch` reorders whole tar shards each epoch, the same
order on every rank, and `random_shuffle` mixes samples inside a buffer of `initial_fill`
(`loader.dali_shuffle_buffer`) on each rank. That is a local shuffle, unlike the torch loader's
global permutation: a batch mixes samples of the shards that are in the buffer.

Decode: npy members through `fn.decoders.numpy` (CPU); lz4 members through `fn.decoders.inflate`
on the GPU, with shape and dtype from the sample's json. Without a GPU, lz4 takes the CPU route:
`fn.python_function` around `lz4.block.decompress`, so the tests run this same pipeline.

Augmentation runs in DALI ops (`fn.slice` with out-of-bounds padding, `fn.flip`, clamp and
affine arithmetic). Its arguments come from one small python function per batch that draws each
sample's crop and flips from `sample_rng(seed, epoch, key)`, the torch loader's own draws: a
sample is augmented the same way whatever the sharding and the backend. The function counts
pipeline iterations to know the epoch; that count is restored with the DALI checkpoint.

Resume: the pipeline is built with `enable_checkpointing`; `state_dict()` holds the iterator's
checkpoint string (reader positions, prefetch accounted for) with the epoch and batch count.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from data_shards.format import MASK_EXT, META_EXT, REPORT_EXT, VOLUME_EXT
from data_shards.tar_io import ShardError, read_sample_members

from .batch import CTBatch
from .loader import KeyJoin, ShardIndex, mask_inside, read_sample
from .text import check_text_view, text_view
from .transforms import TEXT, crop_anchor, flip_draws, sample_rng

log = logging.getLogger(__name__)

READER = "reader"


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class _Draws:
    """DALI python function (batch mode): per sample, the crop anchor (may be negative: padding),
    the 3 flip flags and the stored shape, drawn from (seed, epoch, key). It is called once per
    pipeline iteration, in order, so iteration // iterations-per-epoch is the epoch."""

    def __init__(self, cfg, per_epoch: int, start: int):
        self.cfg, self.per_epoch, self.it = cfg, per_epoch, start

    def __call__(self, metas):
        c = self.cfg
        epoch = self.it // self.per_epoch
        self.it += 1
        anchors, shapes, flips = [], [], [[], [], []]
        for m in metas:
            meta = _json(m)
            shape = meta["shape"]
            rng = sample_rng(c.seed, epoch, meta["key"]) if c.train else None
            anchors.append(np.array(crop_anchor(shape, c.crop, rng), dtype=np.int32))
            f = flip_draws(c.flip_axes, c.flip_prob, rng) if c.train and c.flip_prob > 0 else [0, 0, 0]
            for ax in range(3):
                flips[ax].append(np.array(f[ax], dtype=np.int32))
            shapes.append(np.array(shape, dtype=np.int32))
        return anchors, shapes, *flips


def _json(m: np.ndarray) -> dict:
    return json.loads(m.tobytes())


def _lz4_cpu(dtype: str):
    """The CPU route for lz4 members: one raw LZ4 block -> the stored array (shape from the json)."""
    from data_shards import codecs

    def decode(data, meta):
        info = _json(meta)
        try:
            return codecs.decode(data.tobytes(), "lz4", tuple(info["shape"]), dtype)
        except codecs.CodecError as e:
            raise ValueError(f"sample {info.get('key')}: {e}") from e

    return decode


class DALILoader:
    """Iterate batches of one split for this rank through a DALI pipeline. Same interface and
    state semantics as `CTLoader`: `state_dict()` / `load_state_dict()` resume mid-epoch exactly,
    and a completed pass advances the epoch."""

    backend = "dali"

    def __init__(self, root: str | Path, cfg, split: Optional[str] = "train", rank: int = 0, world_size: int = 1,
                 label_names: Optional[list[str]] = None, anatomies: Optional[list[str]] = None,
                 device: str = "cpu"):
        if not dali_available():
            raise RuntimeError("loader.backend=dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                               "(it runs CPU-only without a GPU), or set loader.backend=torch")
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be cpu or gpu, got {device!r}")
        check_text_view(cfg.text_view)
        self.cfg, self.rank, self.world, self.device = cfg, rank, world_size, device
        self.index = ShardIndex(root, split)
        self.join = KeyJoin(self.index, cfg, label_names, anatomies)
        self.anatomies = tuple(anatomies or ())
        self.codec = self.index.manifest["codec"]
        self.shards = _check_shards(self.index)
        self.missing = _missing_members(self.index, self.codec)
        self.with_mask = not self.missing.get(MASK_EXT[self.codec]) and not cfg.raw
        if self.missing:
            log.warning("%s: missing members %s (e.g. %s); DALI reads them as empty: a missing report gives an "
                        "empty text%s", root, {k: len(v) for k, v in self.missing.items()},
                        {k: v[:3] for k, v in self.missing.items()},
                        ", and masks are not read for this split" if MASK_EXT[self.codec] in self.missing else "")
        self.mask_labels = _first_mask_labels(self.index) if self.with_mask and self.anatomies and not cfg.train else {}
        n, s, b = len(self.index), world_size, cfg.batch_size
        if cfg.last_batch == "drop":
            self._len = (n // s) // b
        elif cfg.last_batch == "pad":
            self._len = math.ceil(math.ceil(n / s) / b)
        else:
            raise ValueError(f"loader.last_batch must be 'pad' or 'drop', got {cfg.last_batch!r}")
        self.iters_per_epoch = math.ceil(math.ceil(n / s) / b)  # what the padded reader runs per epoch
        if self._len == 0:
            raise ValueError(f"{root}: split {split!r} has {n} samples: under one batch of {b} per rank on {s} "
                             f"rank(s); lower loader.batch_size")
        self.positions = {k: i for i, k in enumerate(self.index.keys)}
        self.epoch, self.consumed = 0, 0
        self._build(None)

    # -- pipeline ---------------------------------------------------------------------------------
    def _build(self, checkpoint: Optional[str]) -> None:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali import math as dmath
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        c, codec, gpu = self.cfg, self.codec, self.device == "gpu"
        exts = [VOLUME_EXT[codec], META_EXT, REPORT_EXT] + ([MASK_EXT[codec]] if self.with_mask else [])
        draws = _Draws(c, self.iters_per_epoch, self.epoch * self.iters_per_epoch + self.consumed)
        names = ["volume", "meta", "meta_len", "report", "report_len"]

        def decode(data, meta, shape, dtype):
            if codec == "npy":
                out = fn.decoders.numpy(data)
                return out.gpu() if gpu else out
            if gpu:
                return fn.decoders.inflate(data.gpu(), shape=shape, dtype=getattr(types, dtype.upper()))
            return fn.python_function(data, meta, function=_lz4_cpu(dtype), num_outputs=1)

        @pipeline_def(enable_checkpointing=True)
        def pipe():
            parts = fn.readers.webdataset(
                paths=[str(p) for p, _ in self.shards], index_paths=[str(i) for _, i in self.shards], ext=exts,
                missing_component_behavior="empty", dtypes=[types.UINT8] * len(exts), shard_id=self.rank,
                num_shards=self.world, pad_last_batch=True, random_shuffle=c.shuffle,
                initial_fill=c.dali_shuffle_buffer, shuffle_after_epoch=c.shuffle, seed=c.seed, name=READER)
            data, meta, report = parts[:3]
            anchor, shape, fd, fh, fw = fn.python_function(meta, function=draws, num_outputs=5, batch_processing=True)
            vol = fn.reshape(decode(data, meta, shape, "int16"), layout="DHW")
            mask = fn.reshape(decode(parts[3], meta, shape, "uint8"), layout="DHW") if self.with_mask else None
            outs = {}
            if c.raw:
                outs["volume"] = fn.expand_dims(vol, axes=[0], new_axis_names="C")
            else:
                pad = float(self.index.manifest.get("preprocessing", {}).get("pad_value", -1024))
                # crop and flip the int16 volume (half the bytes of float32), then one fused
                # arithmetic pass: clamp + affine, int16 in, float32 out (the torch loader's ops)
                crop = dict(start=anchor, shape=list(c.crop), axis_names="DHW", out_of_bounds_policy="pad")
                flip = dict(depthwise=fd, vertical=fh, horizontal=fw)
                vol = fn.flip(fn.expand_dims(fn.slice(vol, fill_values=pad, **crop), axes=[0], new_axis_names="C"), **flip)
                lo, hi = (float(x) for x in c.hu_window)
                a, b = (float(x) for x in c.out_range)
                if lo.is_integer() and hi.is_integer():  # int16 clamp: exact, and DALI's CPU int ops are cheap
                    vol = dmath.clamp(vol, int(lo), int(hi))
                else:
                    vol = dmath.clamp(fn.cast(vol, dtype=types.FLOAT), lo, hi)
                outs["volume"] = fn.normalize(vol, mean=lo, stddev=1.0, scale=(b - a) / (hi - lo), shift=a,
                                              dtype=types.FLOAT)
                if mask is not None:
                    full = mask
                    mask = fn.expand_dims(fn.slice(mask, fill_values=0, **crop), axes=[0], new_axis_names="C")
                    outs["anatomy"] = fn.flip(mask, **flip)
                    if self.mask_labels:  # evaluation's 90% rule: each organ's voxels before the crop
                        outs["organ_voxels"] = fn.stack(*[fn.reductions.sum(fn.cast(full == v, dtype=types.INT64))
                                                          for v in self.mask_labels.values()])
            outs.update(meta=fn.pad(meta, fill_value=0), meta_len=meta.shape(),
                        report=fn.pad(report, fill_value=0), report_len=report.shape())
            return tuple(outs.values())

        names = ["volume"] + (["anatomy"] if self.with_mask and not c.raw else []) + \
            (["organ_voxels"] if self.with_mask and self.mask_labels and not c.raw else []) + names[1:]
        kw = dict(batch_size=c.batch_size, num_threads=max(1, c.num_workers), device_id=0 if gpu else None,
                  seed=c.seed, prefetch_queue_depth=max(1, c.prefetch_factor))
        self.pipe = pipe(**kw, checkpoint=checkpoint) if checkpoint else pipe(**kw)
        self.pipe.build()
        policy = LastBatchPolicy.DROP if c.last_batch == "drop" else LastBatchPolicy.FILL
        self.dali_iter = DALIGenericIterator(self.pipe, names, reader_name=READER, last_batch_policy=policy,
                                             auto_reset=False)
        self.stick = bool(self.pipe.reader_meta(READER)["stick_to_shard"])

    def shard_range(self, key: str) -> range:
        """The split positions (manifest order) of the DALI shard this rank reads now, found from a
        key it just read: with `shuffle` DALI sticks to shard `rank` (over the reshuffled tar order,
        so only its size matters); otherwise rank r reads shard (r + epoch) % world, which is the
        shard holding the key (found from the key, so a resumed loader needs no history)."""
        n, s, p = len(self.index), self.world, self.positions[key]
        k = self.rank if self.stick else next(k for k in range(s) if n * k // s <= p < n * (k + 1) // s)
        return range(n * k // s, n * (k + 1) // s)

    # -- iteration --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Only the next epoch can follow: DALI's readers move one epoch at a time. The rest of the
        current epoch is read and dropped (the loop skips a remainder that cannot fill a step)."""
        if epoch == self.epoch:
            return
        if epoch != self.epoch + 1:
            raise ValueError(f"the DALI loader moves one epoch at a time: at epoch {self.epoch}, asked for {epoch}")
        self._finish_epoch()

    def _finish_epoch(self) -> None:
        for _ in self._batches():
            pass
        self.dali_iter.reset()
        self.epoch, self.consumed = self.epoch + 1, 0

    def _batches(self):
        """The DALI iterator's batches up to its epoch end. Never `iter()` it again: that resets it
        and would skip a whole epoch."""
        while True:
            try:
                out = next(self.dali_iter)
            except StopIteration:
                return
            except RuntimeError as e:
                raise ShardError(f"{self._damaged()}DALI could not read a sample of {self.index.root} (rank "
                                 f"{self.rank}, epoch {self.epoch}, batch {self.consumed}): {e}") from None
            yield out

    def _damaged(self) -> str:
        """DALI's decode errors do not name the sample: decode the samples the failing batch can hold
        (the next batches of this rank's range, in order; the whole split when shuffled) with the
        torch loader's decoder and name the first that fails."""
        n, s, b = len(self.index), self.world, self.cfg.batch_size
        if self.cfg.shuffle:
            todo = range(n)
        else:
            k = (self.rank + self.epoch) % s
            start = n * k // s + self.consumed * b
            todo = range(start, min(n * (k + 1) // s, start + (self.cfg.prefetch_factor + 1) * b))
        for i in todo:
            path, entry = self.index.entries[i]
            try:
                read_sample(path, entry)
            except ValueError as e:
                return f"{Path(path).name}: {e}. "
        return ""

    def __iter__(self) -> Iterator[CTBatch]:
        if self.consumed >= self._len:  # a finished epoch not yet advanced (e.g. restored at its end)
            self._finish_epoch()
        for out in self._batches():
            batch = self._to_batch(out[0])
            self.consumed += 1
            yield batch
            if self.consumed >= self._len:
                break
        self._finish_epoch()

    def _to_batch(self, o: dict) -> CTBatch:
        c = self.cfg
        metas = [json.loads(_bytes(m, n)) for m, n in zip(o["meta"], o["meta_len"])]
        keys = [m["key"] for m in metas]
        reports = [_bytes(r, n).decode("utf-8") for r, n in zip(o["report"], o["report_len"])]
        real = self.shard_range(keys[0])
        first = self.consumed * c.batch_size
        pad = [first + i >= real.stop - real.start for i in range(len(keys))]  # the reader's repeats
        if c.train and c.text_view != "report":
            reports = [text_view(r, c.text_view, sample_rng(c.seed, self.epoch, k, TEXT)) for r, k in zip(reports, keys)]
        labels, organ_text, organ_normal = self.join(keys)
        anat = o.get("anatomy")
        if "organ_voxels" in o:
            for m, voxels, crop in zip(metas, o["organ_voxels"].cpu().numpy(), anat.cpu().numpy()):
                if m.get("mask_labels") != self.mask_labels:
                    raise ValueError(f"sample {m['key']}: mask labels {m.get('mask_labels')} differ from the split's "
                                     f"{self.mask_labels}; one split needs one label map")
                full = np.zeros(256, dtype=np.int64)
                full[list(self.mask_labels.values())] = voxels
                m["mask_inside"] = mask_inside(full, crop, self.mask_labels, self.anatomies)
        return CTBatch(volume=o["volume"], report=reports, key=keys, anatomy=anat, labels=labels,
                       is_pad=torch.tensor(pad, dtype=torch.bool), meta=metas, organ_text=organ_text,
                       organ_normal=organ_normal)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.consumed >= self._len:  # checkpoint at the start of the next epoch, not inside the drop
            self._finish_epoch()
        return {"backend": "dali", "epoch": self.epoch, "batches_consumed": self.consumed, **self._setup(),
                "dali_checkpoint": _text(self.dali_iter.checkpoints()[0])}

    def _setup(self) -> dict:
        """What a saved position is only valid for."""
        return {"seed": self.cfg.seed, "num_samples": len(self.index), "world_size": self.world, "rank": self.rank,
                "batch_size": self.cfg.batch_size, "shuffle": self.cfg.shuffle, "last_batch": self.cfg.last_batch}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("backend") != "dali":
            raise ValueError("this loader state was saved by the torch loader; resume with loader.backend=torch "
                             "(the two backends order samples differently)")
        for k, mine in self._setup().items():
            if sd.get(k) != mine:
                raise ValueError(f"loader state was saved with {k}={sd.get(k)!r} but this loader has {mine!r}; "
                                 f"the position cannot be restored exactly")
        self.epoch, self.consumed = int(sd["epoch"]), int(sd["batches_consumed"])
        import base64

        self._build(base64.b64decode(sd["dali_checkpoint"]))


def _text(checkpoint) -> str:
    """DALI's checkpoint (bytes) as text for the rank's JSON state file."""
    import base64

    return base64.b64encode(checkpoint if isinstance(checkpoint, bytes) else checkpoint.encode()).decode("ascii")


def _bytes(t: torch.Tensor, n) -> bytes:
    return t[: int(n[0])].numpy().tobytes()


def _check_shards(index: ShardIndex) -> list[tuple[Path, Path]]:
    """The split's (tar, index) pairs. A tar shorter than its index says (a truncated copy) is an
    error naming the shard and the first sample it cuts, before DALI reads past its end."""
    out, last, sizes = [], {}, {}
    for path, entry in index.entries:
        end = max(o + s for _, o, s, _ in entry.members)
        size = sizes.get(path)
        if size is None:
            size = sizes[path] = Path(path).stat().st_size
        if end > size:
            raise ShardError(f"{Path(path).name}: truncated at byte {size}; sample {entry.key} needs bytes up to "
                             f"{end}. Copy the shard again, or re-create it (ctvlp synth / ctvlp ingest)")
        last[path] = entry
    for sh in index.manifest["shards"]:
        p = str(index.root / sh["name"])
        if p in last:
            out.append((Path(p), index.root / sh["index"]))
    return out


def _missing_members(index: ShardIndex, codec: str) -> dict[str, list[str]]:
    """Members absent from some samples, by extension -> keys. Without a volume or a json a sample
    cannot be read at all: that is an error naming the shard and the sample."""
    missing: dict[str, list[str]] = {}
    mask_somewhere = any(MASK_EXT[codec] in e.exts for _, e in index.entries)
    for path, e in index.entries:
        for ext in (VOLUME_EXT[codec], META_EXT):
            if ext not in e.exts:
                raise ShardError(f"{Path(path).name}: sample {e.key} has no {ext} member; re-create the shard")
        wanted = [REPORT_EXT] + ([MASK_EXT[codec]] if mask_somewhere else [])
        for ext in wanted:
            if ext not in e.exts:
                missing.setdefault(ext, []).append(e.key)
    return missing


def _first_mask_labels(index: ShardIndex) -> dict:
    path, entry = index.entries[0]
    with open(path, "rb") as f:
        meta = json.loads(read_sample_members(f, entry)[META_EXT])
    labels = meta.get("mask_labels") or {}
    return dict(labels)

