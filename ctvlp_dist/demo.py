"""`ctvlp demo` / `make demo`: the main job on the embedded synthetic default.

Today: synth -> shards -> verify -> one training epoch through the CPU loader. Later stages
(silver labels, training, evaluation) plug in after the loader.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from tqdm import tqdm


def run_demo(cfg, progress: bool = True) -> int:
    from data_shards.synth.cohort import run_synth
    from data_shards.verify import verify_dataset

    from .data import CTLoader

    d = cfg.demo
    out = Path(d.out)
    data = out / "data"
    t0 = time.time()
    cfg.synth = dataclasses.replace(cfg.synth, patients=d.patients, out=str(data), shape=d.shape, spacing=d.spacing)
    s = run_synth(cfg, progress=progress)
    print(f"[1/3] synthetic cohort: {s['samples_written']} scans of {d.patients} patients -> {data}")
    res = verify_dataset(data, progress=(lambda it: tqdm(it, desc="verify", unit="shard")) if progress else None)
    print(f"[2/3] verify: {res.summary()}")
    if not res.ok:
        return 1
    crop = tuple(min(c, s_) for c, s_ in zip(cfg.loader.crop, d.shape))
    lcfg = dataclasses.replace(cfg.loader, crop=crop, labels=str(data / "ground_truth.csv"))
    loader = CTLoader(data, lcfg, split="train")
    n, shape, pos = 0, None, 0.0
    for b in tqdm(loader, total=len(loader), desc="load epoch", unit="batch", disable=not progress):
        n += int((~b.is_pad).sum())
        shape = tuple(b.volume.shape)
        pos += float(b.labels[~b.is_pad].sum())
    summary = {"scans": s["samples_written"], "train_samples_loaded": n, "batch_volume_shape": shape,
               "mean_positive_findings_per_scan": round(pos / max(n, 1), 2), "seconds": round(time.time() - t0, 1)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[3/3] loader: one train epoch, {n} samples, batch volume {shape}")
    print(json.dumps(summary))
    print(f"demo done in {summary['seconds']} s; summary in {out / 'demo_summary.json'}")
    return 0
