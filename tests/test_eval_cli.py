"""`ctvlp eval` end to end on real shards with an exported model: metrics.json's top-level keys,
report.md with its tables, and the PNG plots."""
import json

import torch

from ctvlp_dist.config import ModelConfig
from ctvlp_dist.models import CTCLIP
from ctvlp_dist.models.export import save_exported

from .conftest import run_ctvlp


def test_eval_writes_metrics_report_and_plots(train_cohort, tmp_path):
    data, _ = train_cohort
    cfg = ModelConfig(stem="k4s4", norm="gn", gn_groups=8, latent_dim=32, text_max_length=32)
    torch.manual_seed(0)
    save_exported(CTCLIP(cfg).state_dict(), cfg, tmp_path / "run" / "model.safetensors", {"stage": "clip"})
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 - s / 10}) + "\n"
                                                            for s in (1, 2, 3)))
    out = tmp_path / "eval"
    p = run_ctvlp("eval", "--checkpoint", str(tmp_path / "run"), "--data", str(data), "--out", str(out),
                  "--split", "train", "loader.crop=[16,32,32]", f"eval.runs=[{tmp_path / 'run'}]",
                  "eval.linear_probe=true", "eval.probe_split=train", "eval.bootstrap=50", "--quiet")
    m = json.loads((out / "metrics.json").read_text())
    assert m["samples"] == 16 and m["split"] == "train" and m["labels_source"] == "gold"
    zs = m["zero_shot"]
    # the macro AUC is the mean of the per-finding AUCs it reports, over the findings it scored
    aucs = [r["auc"] for r in zs["per_finding"].values() if r["auc"] == r["auc"]]
    assert zs["findings_scored"] == len(aucs) >= 5 and abs(zs["macro_auc"] - sum(aucs) / len(aucs)) < 1e-12
    assert zs["macro_auc_ci95"]["low"] <= zs["macro_auc"] <= zs["macro_auc_ci95"]["high"]
    assert zs["macro_auc_ci95"]["resamples"] > 0
    assert set(zs["weighted"]) == {"f1", "sensitivity", "specificity", "precision"}
    ii, ri = m["retrieval"]["image_image"], m["retrieval"]["report_image"]
    assert {"map_at_1", "map_at_50", "published_running_average_map_at_50"} <= set(ii)
    assert ri["recall_at_100"] == 1.0  # 16 volumes: every report finds its own within 100
    assert ii["published_running_average_map_at_1"] == ii["map_at_1"]
    assert m["linear_probe"]["per_finding_auc"]
    report = (out / "report.md").read_text()
    assert "## Zero-shot diagnosis" in report and "running average" in report and "![ROC curves]" in report
    for png in ("roc_curves.png", "auc_per_finding.png", "loss_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "zero-shot macro AUC" in p.stdout
    assert "silver" not in report


def test_eval_against_silver_labels_says_so(train_cohort, tmp_path):
    """With no gold labels (no --gold, no ground_truth.csv beside the shards), evaluation falls back
    to the training labels, and says so: a warning at the top of report.md, labels_source in
    metrics.json and on stderr. --labels, the old name of --gold, still works with a notice."""
    import shutil

    data, labels = train_cohort
    bare = tmp_path / "shards"
    shutil.copytree(data, bare)
    (bare / "ground_truth.csv").unlink()
    cfg = ModelConfig(stem="k4s4", norm="gn", gn_groups=8, latent_dim=32, text_max_length=32)
    save_exported(CTCLIP(cfg).state_dict(), cfg, tmp_path / "run" / "model.safetensors", {"stage": "clip"})
    common = ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(bare), "--split", "train",
              "loader.crop=[16,32,32]", "eval.bootstrap=0", "--quiet"]
    p = run_ctvlp(*common, "--out", str(tmp_path / "silver"), f"loader.labels={labels}")
    m = json.loads((tmp_path / "silver" / "metrics.json").read_text())
    assert m["labels_source"] == "silver" and m["labels"] == str(labels)
    report = (tmp_path / "silver" / "report.md").read_text()
    assert report.splitlines()[2].startswith("> **Warning: scored against silver labels**")
    assert "silver" in p.stderr
    p = run_ctvlp(*common, "--out", str(tmp_path / "old"), "--labels", str(data / "ground_truth.csv"))
    assert "--labels is deprecated, use --gold" in p.stderr
    assert json.loads((tmp_path / "old" / "metrics.json").read_text())["labels_source"] == "gold"
