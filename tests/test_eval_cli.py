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
    assert m["samples"] == 16 and m["split"] == "train"
    zs = m["zero_shot"]
    assert 0 <= zs["macro_auc"] <= 1 and zs["findings_scored"] >= 5
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
