"""`ctvlp bench loader`: CPU loader throughput at the stored size, and codec compression.

Throughput = samples/s and MB/s of decoded int16 voxels at the stored shape, for a raw pass
(read + decode only) and a training pass (decode + crop + flip + HU window), per codec.
Compression ratio = raw int16 bytes / stored volume bytes, on the synthetic cohort and, when
../shared/data is present, on the real example CT.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from .record import markdown_table, write_result

REAL_CT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "example_ct.nii.gz"


def _throughput(root, cfg, raw: bool, progress: bool) -> dict:
    from tqdm import tqdm

    from ..data import CTLoader

    lcfg = dataclasses.replace(cfg.loader, raw=raw, train=not raw, last_batch="drop" if not raw else "pad")
    loader = CTLoader(root, lcfg, split=None)
    n, t0 = 0, time.perf_counter()
    limit = cfg.bench.batches or len(loader)
    for i, b in enumerate(tqdm(loader, total=limit, desc=f"{'raw' if raw else 'train'} pass", disable=not progress)):
        n += int((~b.is_pad).sum())
        if i + 1 >= limit:
            break
    dt = time.perf_counter() - t0
    shape = loader.index.manifest["preprocessing"]["stored_shape"]
    mb = n * int(np.prod(shape)) * 2 / 1e6
    return {"samples": n, "seconds": round(dt, 3), "samples_per_s": round(n / dt, 2), "decoded_MB_per_s": round(mb / dt, 1)}


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
        for name, root in datasets.items():
            ratios[name] = _ratio(root)
            for raw in (True, False):
                r = _throughput(root, cfg, raw, progress)
                rows.append({"dataset": name, "pass": "decode only" if raw else "train transforms", **r})
    payload = {"config": {"loader": dataclasses.asdict(cfg.loader), "patients": cfg.bench.patients,
                          "stored_shape": list(cfg.synth.shape or cfg.preprocess.stored_shape)},
               "throughput": rows, "compression_ratio_synthetic": ratios,
               "compression_ratio_real_example_ct": real_ct_ratios(cfg.preprocess)}
    path = write_result(cfg.bench.results_dir, "loader", payload, argv)
    print(markdown_table(rows, ["dataset", "pass", "samples", "seconds", "samples_per_s", "decoded_MB_per_s"]))
    print(f"compression ratio (raw int16 / stored): synthetic {ratios}, real example CT "
          f"{payload['compression_ratio_real_example_ct'] or 'n/a (../shared/data absent)'}")
    print(f"wrote {path}")
    return payload
