"""`ctvlp bench loader`: CPU loader throughput at the stored size, and codec compression.

Throughput = samples/s and MB/s of decoded int16 voxels at the stored shape, for a raw pass
(read + decode only) and a training pass (decode + crop + flip + HU window), per codec.
Compression ratio = raw int16 bytes / stored volume bytes, on the synthetic cohort and, when
../shared/data is present, on the real example CT.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from ..records import markdown_table, write_result

REAL_CT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "example_ct.nii.gz"


def _throughput(root, cfg, raw: bool, progress: bool, workers=None) -> dict:
    """Median over `bench.repeats` full passes (each a fresh epoch, workers started inside)."""
    from tqdm import tqdm

    from ..data import CTLoader

    lcfg = dataclasses.replace(cfg.loader, raw=raw, train=not raw, last_batch="drop" if not raw else "pad",
                               num_workers=cfg.loader.num_workers if workers is None else workers)
    loader = CTLoader(root, lcfg, split=None)
    limit = cfg.bench.batches or len(loader)
    times = []
    for rep in range(max(1, cfg.bench.repeats)):
        n, t0 = 0, time.perf_counter()
        for i, b in enumerate(tqdm(loader, total=limit, desc=f"{'raw' if raw else 'train'} pass {rep + 1}",
                                   disable=not progress)):
            n += int((~b.is_pad).sum())
            if i + 1 >= limit:
                break
        times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    shape = loader.index.manifest["preprocessing"]["stored_shape"]
    mb = n * int(np.prod(shape)) * 2 / 1e6
    return {"samples": n, "seconds": round(dt, 3), "spread_s": [round(min(times), 3), round(max(times), 3)],
            "samples_per_s": round(n / dt, 2), "decoded_MB_per_s": round(mb / dt, 1)}


def copy_ceiling_MB_per_s(shape, repeats: int = 20) -> float:
    """Same-run baseline: one core copying a stored-size int16 volume (MB of volume per second).

    Decoding an npy member is at least one such copy, so per worker this bounds decode speed.
    """
    src = np.random.default_rng(0).integers(-1000, 1000, size=shape, dtype=np.int16)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return round(src.nbytes / 1e6 / float(np.median(times)), 1)


def first_touch_MB_per_s(shape, repeats: int = 10) -> float:
    """Same-run baseline: allocate and fill a fresh float32 crop-sized buffer (page faults).
    Each loader batch lives in fresh memory, so this bounds how fast batches can be born."""
    import torch

    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        t = torch.empty(shape, dtype=torch.float32).fill_(1.0)
        times.append(time.perf_counter() - t0)
        del t
    return round(int(np.prod(shape)) * 4 / 1e6 / float(np.median(times[1:])), 1)


def _ratio(root) -> float:
    from data_shards.writer import load_manifest

    m = load_manifest(root)
    raw = m["num_samples"] * int(np.prod(m["preprocessing"]["stored_shape"])) * 2
    stored = 0
    from data_shards.tar_io import read_index

    for sh in m["shards"]:
        for e in read_index(Path(root) / sh["index"]):
            stored += e.member("vol." + m["codec"])[1]
    return round(raw / stored, 3)


def real_ct_ratios(preprocess_cfg) -> dict:
    """Compression of the real example CT after ingest to the stored grid (skipped if absent)."""
    if not REAL_CT.exists():
        return {}
    from data_shards import codecs
    from data_shards.ingest.preprocess import preprocess
    from data_shards.ingest.readers import read_nifti

    vol, _, _ = preprocess(read_nifti(REAL_CT), preprocess_cfg)
    raw = vol.nbytes
    return {c: round(raw / len(codecs.encode(vol, c)), 3) for c in codecs.CODECS}


def run(cfg, progress: bool = True, argv=None) -> dict:
    from data_shards.synth.cohort import run_synth

    rows, ratios = [], {}
    with tempfile.TemporaryDirectory(prefix="ctvlp-bench-") as tmp:
        datasets = {}
        if cfg.bench.data:
            datasets["given"] = Path(cfg.bench.data)
        else:
            for codec in ("npy", "lz4"):
                root = Path(tmp) / codec
                c = dataclasses.replace(cfg, synth=dataclasses.replace(cfg.synth, out=str(root), patients=cfg.bench.patients),
                                        shard=dataclasses.replace(cfg.shard, codec=codec))
                run_synth(c, progress=progress)
                datasets[codec] = root
        shape = tuple(cfg.synth.shape or cfg.preprocess.stored_shape)
        ceiling = copy_ceiling_MB_per_s(shape)
        touch = first_touch_MB_per_s((cfg.loader.batch_size, 1, *cfg.loader.crop))
        workers = max(1, cfg.loader.num_workers)
        for name, root in datasets.items():
            ratios[name] = _ratio(root)
            for raw, nw in ((True, workers), (False, workers), (False, 0)):
                r = _throughput(root, cfg, raw, progress, nw)
                r["fraction_of_copy_ceiling"] = round(r["decoded_MB_per_s"] / (ceiling * max(nw, 1)), 3)
                rows.append({"dataset": name, "pass": "decode only" if raw else "train transforms",
                             "workers": nw, **r})
    payload = {"config": {"loader": dataclasses.asdict(cfg.loader), "patients": cfg.bench.patients,
                          "stored_shape": list(cfg.synth.shape or cfg.preprocess.stored_shape)},
               "copy_ceiling_MB_per_s_per_core": ceiling, "first_touch_MB_per_s_per_core": touch,
               "throughput": rows, "compression_ratio_synthetic": ratios,
               "compression_ratio_real_example_ct": real_ct_ratios(cfg.preprocess)}
    path = write_result(cfg.bench.results_dir, "loader", payload, argv)
    print(markdown_table(rows, ["dataset", "pass", "workers", "samples", "seconds", "samples_per_s", "decoded_MB_per_s",
                                "fraction_of_copy_ceiling"]))
    print(f"baseline (same run): one core copies a stored-size volume at {ceiling} MB/s; "
          f"ceiling for {workers} worker(s) = {ceiling * workers:.0f} MB/s; first touch of fresh batch memory "
          f"runs at {touch} MB/s of float32 per core")
    print(f"compression ratio (raw int16 / stored): synthetic {ratios}, real example CT "
          f"{payload['compression_ratio_real_example_ct'] or 'n/a (../shared/data absent)'}")
    print(f"wrote {path}")
    return payload
