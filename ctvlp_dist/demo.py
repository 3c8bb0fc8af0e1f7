"""`ctvlp demo` / `make demo`: the whole path on the embedded synthetic default.

1. a synthetic cohort with a patient-level split, as shards; 2. verify them; 3. silver labels
from the reports with the rules backend (all) and the real vLLM engine (SmolLM2-135M on CPU, the
first demo.vllm_reports), each scored against the synthetic truth; 4. the supervised stage, then
the CLIP stage from its export, each a 2-worker Ray Train + DeepSpeed job on the rules labels;
5. evaluation on the held-out test patients; 6. runs/demo/report.md, metrics.json and plots.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from tqdm import tqdm

STEPS = 6


def _step(i: int, text: str) -> None:
    print(f"[{i}/{STEPS}] {text}", flush=True)


def _labels(cfg, data: Path, out: Path, backend: str, limit: int, progress: bool) -> dict:
    from .labels.evaluate import evaluate_labels
    from .labels.runner import run_label

    path = out / f"labels_{backend}.parquet"
    lc = dataclasses.replace(cfg.label, reports=str(data), out=str(path), backend=backend, limit=limit)
    run_label(dataclasses.replace(cfg, label=lc), progress=progress)
    ev = evaluate_labels(str(path), str(data / "ground_truth.csv"), json_out=str(out / f"labels_{backend}_eval.json"))
    return {"path": str(path), "reports": limit or ev.get("n", None), "macro_auc": ev["macro_auc"],
            "micro_f1": ev["micro_f1"], "macro_f1": ev.get("macro_f1")}


def _train(cfg, data: Path, labels: str, out: Path, stage: str, steps: int, workers: int, init_from=None,
           lr: float = 0.0) -> dict:
    from .train.launch import train

    tc = dataclasses.replace(cfg.train, stage=stage, data=str(data), out=str(out), steps=steps, workers=workers,
                             init_from=init_from, resume="none", progress=cfg.train.progress)
    run = dataclasses.replace(cfg, train=tc, loader=dataclasses.replace(cfg.loader, labels=labels),
                              optim=dataclasses.replace(cfg.optim, lr=lr or cfg.optim.lr))
    return train(run)


def run_demo(cfg, progress: bool = True) -> int:
    from data_shards.synth.cohort import run_synth
    from data_shards.verify import verify_dataset

    from .records import environment
    from .eval.runner import evaluate_model

    d = cfg.demo
    out = Path(d.out)
    data = out / "data"
    t0 = time.time()
    cfg.train.progress = progress
    cfg.synth = dataclasses.replace(cfg.synth, patients=d.patients, out=str(data), shape=d.shape, spacing=d.spacing)
    s = run_synth(cfg, progress=progress)
    _step(1, f"synthetic cohort: {s['samples_written']} scans of {d.patients} patients, patient-level split -> {data}")
    res = verify_dataset(data, progress=(lambda it: tqdm(it, desc="verify", unit="shard")) if progress else None)
    _step(2, f"verify: {res.summary()}")
    if not res.ok:
        return 1
    quality = {"rules": _labels(cfg, data, out, "rules", 0, progress)}
    if d.vllm_reports:
        quality["vllm"] = _labels(cfg, data, out, "vllm", d.vllm_reports, progress)
    _step(3, "silver labels vs synthetic truth: " + ", ".join(
        f"{k} macro AUC {v['macro_auc']:.3f} (micro F1 {v['micro_f1']:.3f})" for k, v in quality.items()))
    silver = quality["rules"]["path"]
    sup = _train(cfg, data, silver, out / "supervised", "supervised", d.supervised_steps, d.workers)
    clip = _train(cfg, data, silver, out / "clip", "clip", d.clip_steps, d.workers, init_from=sup["export"],
                  lr=d.clip_lr)
    _step(4, f"training: supervised {sup['steps']} steps (loss {sup['final_loss']:.3f}), clip {clip['steps']} steps "
             f"(loss {clip['final_loss']:.3f}), {d.workers} Ray Train workers, ZeRO-{clip['zero_stage']}")
    ev_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, checkpoint=clip["export"], data=str(data),
                                                               out=str(out), split="test",
                                                               runs=(str(out / "supervised"), str(out / "clip"))))
    m = evaluate_model(ev_cfg, progress=progress)
    zs = m["zero_shot"]
    _step(5, f"evaluation on {m['samples']} held-out scans: zero-shot macro AUC {zs['macro_auc']:.3f}")
    env = environment()  # the CPU's SIMD decides the trained weights' last bits (benchmarks/README.md)
    m["demo"] = {"seconds": round(time.time() - t0, 1), "label_quality": quality,
                 "training": {"supervised": sup, "clip": clip}, "environment": env}
    (out / "metrics.json").write_text(json.dumps(m, indent=1))
    report = out / "report.md"
    rows = "\n".join(f"| {k} | {v['reports'] or 'all'} | {v['macro_auc']:.3f} | {v['micro_f1']:.3f} |"
                     for k, v in quality.items())
    report.write_text(report.read_text().replace("## Zero-shot diagnosis", (
        "## Silver labels against the synthetic truth\n\n| backend | reports | macro AUC | micro F1 |\n|---|---|---|---|\n"
        f"{rows}\n\nTraining used the rules labels. Demo time {m['demo']['seconds']} s on {env['device']} "
        f"with {' '.join(env['cpu_simd']) or 'no listed SIMD'}, torch {env['torch']}.\n\n## Zero-shot diagnosis"), 1))
    _step(6, f"report: {report} (metrics.json and plots beside it)")
    head = {"zero_shot_macro_auc": round(zs["macro_auc"], 4),
            "map_at_50": round(m["retrieval"]["image_image"].get("map_at_50", float("nan")), 4),
            "recall_at_100": round(m["retrieval"]["report_image"].get("recall_at_100", float("nan")), 4),
            "seconds": m["demo"]["seconds"]}
    print(json.dumps(head))
    print(f"demo done in {head['seconds']} s; report: {report}")
    return 0
