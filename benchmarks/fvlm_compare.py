"""fVLM vs the seed method on the synthetic cohort at 48x96x96: same data, same steps.

Both start from one supervised (BCE) tower; then the seed method's CLIP stage and the fVLM stage
each run the same number of steps on the same shards, with the same locked tower, frozen text
tower, batch and learning rate. Both are evaluated on the test split: zero-shot per finding
(fVLM: on the finding's organ) and retrieval. One JSON record in benchmarks/results/ and a
markdown table on stdout.

    python benchmarks/fvlm_compare.py --out runs/fvlm_compare [--patients 400] [--sup-steps 300] [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE, SPACING = "[48,96,96]", "[6.0,3.5,3.5]"  # the synthetic cohort's coarsest chest grid
LOCAL_FINDINGS = ("Lung nodule", "Pleural effusion", "Coronary artery wall calcification", "Hiatal hernia")


def ctvlp(*args: str) -> None:
    cmd = [str(Path(sys.executable).parent / "ctvlp"), *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def common(a) -> list[str]:
    """The model and loader both stages share (the demo's lite tower, frozen cached text tower)."""
    return ["--config", "configs/model_r3d18_lite.yaml", "model.width=16", "model.norm=bn", "model.latent_dim=128",
            "model.text_trainable_layers=0", "model.text_max_length=128", f"loader.batch_size={a.batch}",
            "loader.num_workers=1", f"loader.crop={SHAPE}", "loader.hu_window=[-1000.0,1000.0]",
            "train.launcher=local", "train.precision=fp32", "train.zero_stage=0", "train.threads_per_worker=2",
            "train.progress=false"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/fvlm_compare")
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument("--sup-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200, help="steps of each contrastive stage (clip, fvlm)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    data, labels, split = out / "data", out / "labels.parquet", out / "split.parquet"
    anat = "model.anatomies=[lung,heart,aorta,esophagus]"
    t0, times = time.perf_counter(), {}
    if not (data / "manifest.json").exists():
        ctvlp("synth", "--patients", str(a.patients), "--out", str(data), f"synth.shape={SHAPE}",
              f"synth.spacing={SPACING}", "shard.split_fractions={train: 0.75, val: 0.05, test: 0.2}", "--quiet")
    ctvlp("label", "--reports", str(data), "--out", str(labels), "--quiet")
    ctvlp("label", "split", "--reports", str(data), "--silver", str(labels), "--out", str(split),
          "--truth", str(data / "sentence_truth.jsonl"), "--json", str(out / "split_score.json"), "--quiet")
    times["data"] = time.perf_counter() - t0
    # both contrastive stages start from this one export (fVLM adds its organ pooling, fresh)
    sup = out / "supervised"
    t = time.perf_counter()
    ctvlp("train", *common(a), "--data", str(data), "--labels", str(labels), "--out", str(sup),
          "train.stage=supervised", f"train.steps={a.sup_steps}", "optim.lr=3e-3", "optim.warmup_steps=10")
    times["supervised"] = time.perf_counter() - t
    runs = {}
    for stage, extra in (("clip", ["loader.text_view=sentence", "train.group_identical_texts=true",
                                   "train.aux_weight=1.0", "train.aux_text=false"]),
                         ("fvlm", ["--organ-texts", str(split), "train.fvlm_global_weight=1.0", anat])):
        run = out / stage
        t = time.perf_counter()
        ctvlp("train", *common(a), "--data", str(data), "--labels", str(labels), "--out", str(run),
              f"train.stage={stage}", f"train.steps={a.steps}", f"optim.lr={a.lr}", "optim.warmup_steps=5",
              f"train.init_from={sup / 'model.safetensors'}", "train.lock_image=true", *extra)
        times[stage] = time.perf_counter() - t
        ctvlp("eval", "--checkpoint", str(run), "--data", str(data), "--out", str(out / f"eval_{stage}"),
              "--split", "test", "eval.bootstrap=200", "--quiet", *common(a)[:2], "loader.crop=" + SHAPE,
              "loader.hu_window=[-1000.0,1000.0]", "loader.num_workers=1")
        runs[stage] = json.loads((out / f"eval_{stage}" / "metrics.json").read_text())
    rows = []
    names = list(runs["clip"]["zero_shot"]["per_finding"])
    for n in names:
        c, f = runs["clip"]["zero_shot"]["per_finding"][n], runs["fvlm"]["zero_shot"]["per_finding"][n]
        rows.append({"finding": n, "local": n in LOCAL_FINDINGS, "positives": f"{c['support']}/{c['n']}",
                     "clip_auc": c["auc"], "fvlm_auc": f["auc"]})
    organs = {o: {"fvlm_macro_auc": v["macro_auc"], "findings": v["findings"], "skipped_volumes": v["skipped_volumes"],
                  "clip_macro_auc": _mean([runs["clip"]["zero_shot"]["per_finding"][n]["auc"] for n in v["findings"]])}
              for o, v in runs["fvlm"]["zero_shot"]["per_organ"].items()}
    summary = {s: {"macro_auc": r["zero_shot"]["macro_auc"], "macro_auc_ci95": r["zero_shot"].get("macro_auc_ci95"),
                   "recall_at_10": r["retrieval"]["report_image"]["recall_at_10"],
                   "map_at_10": r["retrieval"]["image_image"]["map_at_10"], "train_seconds": times[s]}
               for s, r in runs.items()}
    sys.path.insert(0, str(ROOT))
    from ctvlp_dist.records import markdown_table, write_result

    payload = {"settings": vars(a), "shape": SHAPE, "spacing": SPACING, "seconds": times,
               "split_score": json.loads((out / "split_score.json").read_text()),
               "summary": summary, "per_organ": organs, "per_finding": rows}
    path = write_result(a.results, "fvlm-compare", payload, argv=[sys.argv[0], *(argv or sys.argv[1:])])
    fmt = lambda v: "n/a" if v is None or v != v else f"{v:.3f}"  # noqa: E731
    print(markdown_table([{"finding": r["finding"] + (" (local)" if r["local"] else ""), "positives": r["positives"],
                           "seed CLIP": fmt(r["clip_auc"]), "fVLM": fmt(r["fvlm_auc"])} for r in rows],
                         ["finding", "positives", "seed CLIP", "fVLM"]))
    print(markdown_table([{"organ": o, "seed CLIP": fmt(v["clip_macro_auc"]), "fVLM": fmt(v["fvlm_macro_auc"])}
                          for o, v in organs.items()], ["organ", "seed CLIP", "fVLM"]))
    print(json.dumps(summary))
    print(f"record: {path}")
    return 0


def _mean(xs):
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


if __name__ == "__main__":
    raise SystemExit(main())
