"""`ctvlp embed`: a cohort's image and report embeddings, keyed by sample, streamed to disk.

Evaluation's embedding (`embed_batches`: centre crops, every sample once), written batch by batch:
memory is bounded by the batch (and a Parquet row group of `ROWS` rows), never by the cohort.
Parquet: one row per sample (key, split, image, report as float32 lists). npy: a folder with
keys.txt, splits.txt, image.npy and report.npy [N, d], filled in place through memory maps. On a
GPU the towers run in eval mode on the Triton convolutions, which fold BatchNorm into them.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np

ROWS = 1024  # Parquet rows buffered before a row group is written


def run_embed(cfg, progress: bool = True) -> dict:
    import torch
    from tqdm import tqdm

    from ..models.export import load_exported
    from .embed import embed_batches, embed_loader, resolve_checkpoint

    ec = cfg.embed
    if not ec.checkpoint or not ec.data or not ec.out:
        raise ValueError("ctvlp embed needs --checkpoint RUN_OR_EXPORT, --data SHARDS and --out FILE.parquet (or DIR "
                         "with embed.format=npy)")
    cuda = torch.cuda.is_available()
    model = load_exported(resolve_checkpoint(ec.checkpoint), conv_impl="triton" if cuda else None)
    model = model.to("cuda") if cuda else model
    loader = embed_loader(model, ec.data, cfg.loader, ec.split, None, [], ec.batch_size)
    n = len(loader.index)
    t0 = time.perf_counter()
    sink = (ParquetSink if ec.format == "parquet" else NpySink)(Path(ec.out), n, {
        "checkpoint": str(ec.checkpoint), "data": str(ec.data), "split": ec.split or "all"})
    first = high = None
    try:
        for part in embed_batches(model, tqdm(loader, total=len(loader), desc="embed", unit="batch",
                                              disable=not progress)):
            sink.add(part)
            rss = resident_bytes()
            first = rss if first is None else first
            high = max(high or rss, rss)
    finally:
        sink.close()
    if sink.count != n:
        raise RuntimeError(f"embedded {sink.count} samples of {n}: the loader lost some")
    return {"samples": sink.count, "dim": sink.dim, "out": str(ec.out), "format": ec.format,
            "seconds": round(time.perf_counter() - t0, 2), "device": "cuda" if cuda else "cpu",
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            # what the cohort adds: the most the resident set grew after the first batch
            "rss_growth_bytes": (high - first) if first is not None else 0}


def resident_bytes() -> int:
    """This process's resident set now (the peak, ru_maxrss, is set by loading the model)."""
    import os

    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ParquetSink:
    def __init__(self, out: Path, n: int, meta: dict):
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out, self.meta, self.count, self.dim = out, meta, 0, None
        self.writer, self.buf = None, []

    def add(self, part: dict) -> None:
        self.dim = int(part["image"].shape[1])
        self.buf += [(k, s, i, r) for k, s, i, r in zip(part["keys"], part["splits"], part["image"].numpy(),
                                                         part["report"].numpy())]
        self.count += len(part["keys"])
        if len(self.buf) >= ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.buf:
            return
        vec = pa.list_(pa.float32(), self.dim)
        table = pa.table({"key": [b[0] for b in self.buf], "split": [b[1] for b in self.buf],
                          "image": pa.array([b[2] for b in self.buf], type=vec),
                          "report": pa.array([b[3] for b in self.buf], type=vec)})
        if self.writer is None:
            schema = table.schema.with_metadata({"ctvlp_embed": json.dumps({**self.meta, "dim": self.dim})})
            self.writer = pq.ParquetWriter(str(self.out) + ".partial", schema)
        self.writer.write_table(table.replace_schema_metadata(self.writer.schema.metadata))
        self.buf = []

    def close(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            Path(str(self.out) + ".partial").replace(self.out)


class NpySink:
    def __init__(self, out: Path, n: int, meta: dict):
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.n, self.meta, self.count, self.dim = out, n, meta, 0, None
        self.keys = open(out / "keys.txt", "w")
        self.splits = open(out / "splits.txt", "w")
        self.arrays = {}

    def add(self, part: dict) -> None:
        if not self.arrays:
            self.dim = int(part["image"].shape[1])
            self.arrays = {k: np.lib.format.open_memmap(self.out / f"{k}.npy", mode="w+", dtype=np.float32,
                                                        shape=(self.n, self.dim)) for k in ("image", "report")}
        b = len(part["keys"])
        for k, arr in self.arrays.items():
            arr[self.count:self.count + b] = part[k].numpy()
        self.keys.write("".join(k + "\n" for k in part["keys"]))
        self.splits.write("".join(s + "\n" for s in part["splits"]))
        self.count += b

    def close(self) -> None:
        for arr in self.arrays.values():
            arr.flush()
        self.keys.close()
        self.splits.close()
        (self.out / "meta.json").write_text(json.dumps({**self.meta, "dim": self.dim, "samples": self.count}, indent=1))
