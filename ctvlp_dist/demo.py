"""`ctvlp demo` / `make demo`: the main job on the embedded synthetic default.

Today: synth -> shards -> verify -> silver labels (rules; scored against the synthetic truth)
-> one training epoch through the CPU loader, joined with the silver labels by key. Training
and evaluation plug in after the loader.
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
    print(f"[1/4] synthetic cohort: {s['samples_written']} scans of {d.patients} patients -> {data}")
    res = verify_dataset(data, progress=(lambda it: tqdm(it, desc="verify", unit="shard")) if progress else None)
    print(f"[2/4] verify: {res.summary()}")
    if not res.ok:
        return 1
    from .labels.evaluate import run_eval
    from .labels.runner import run_label

    silver = out / "labels_rules.parquet"
    run_label(dataclasses.replace(cfg, label=dataclasses.replace(cfg.label, reports=str(data), out=str(silver),
                                                                 backend="rules", metrics_port=-1)), progress=progress)
    ev = run_eval(str(silver), str(data / "ground_truth.csv"), json_out=str(out / "labels_rules_eval.json"))
    print(f"[3/4] silver labels (rules) vs synthetic truth: macro AUC {ev['macro_auc']:.3f}, "
          f"micro F1 {ev['micro_f1']:.3f} -> {silver}")
    crop = tuple(min(c, s_) for c, s_ in zip(cfg.loader.crop, d.shape))
    lcfg = dataclasses.replace(cfg.loader, crop=crop, labels=str(silver))
    loader = CTLoader(data, lcfg, split="train")
    n, shape, pos = 0, None, 0.0
    for b in tqdm(loader, total=len(loader), desc="load epoch", unit="batch", disable=not progress):
        n += int((~b.is_pad).sum())
        shape = tuple(b.volume.shape)
        pos += float((b.labels[~b.is_pad] == 1).sum())
    summary = {"scans": s["samples_written"], "train_samples_loaded": n, "batch_volume_shape": shape,
               "silver_labels_macro_auc": round(ev["macro_auc"], 4), "silver_labels_micro_f1": round(ev["micro_f1"], 4),
               "mean_positive_silver_labels_per_scan": round(pos / max(n, 1), 2), "seconds": round(time.time() - t0, 1)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[4/4] loader: one train epoch, {n} samples with silver labels joined by key, batch volume {shape}")
    print(json.dumps(summary))
    print(f"demo done in {summary['seconds']} s; summary in {out / 'demo_summary.json'}")
    return 0
