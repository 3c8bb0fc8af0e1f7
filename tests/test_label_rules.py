"""The rules labeler: negation and uncertainty scopes, and the bars on the real dev reports."""
import json
import subprocess
import sys

import pytest

from data_shards.label_sets import load_label_set
from ctvlp_dist.labels.rules import RulesLabeler

CT = RulesLabeler(load_label_set("ctrate18"))


@pytest.mark.parametrize("text,finding,hard", [
    ("No pleural effusion was observed.", "Pleural effusion", 0),
    ("Pleural effusion-thickening was not detected.", "Pleural effusion", 0),
    ("Bilateral pleural effusion is present.", "Pleural effusion", 1),
    ("Pericardial effusion is observed.", "Pleural effusion", 0),  # not the pleura
    ("Pericardial effusion is observed.", "Pericardial effusion", 1),
    ("A 4 mm nodule in the right lower lobe (intrapulmonary lymph node?).", "Lung nodule", -1),
    ("Findings suspicious for consolidation in the left lower lobe.", "Consolidation", -1),
    ("Heart contour, size are normal.", "Cardiomegaly", 0),
    ("The heart is larger than normal.", "Cardiomegaly", 1),
    ("Atheroma plaques are observed in the aorta and coronary arteries.", "Arterial wall calcification", 1),
    ("Atheroma plaques are observed in the aorta and coronary arteries.", "Coronary artery wall calcification", 1),
    ("Calcific plaques in the LAD.", "Arterial wall calcification", 0),
    ("A 13x9 mm lymph node that did not reach the pathological size was observed.", "Lymphadenopathy", 1),
    ("No pathological LAP was detected in the mediastinum.", "Lymphadenopathy", 0),
    ("Findings consistent with emphysema.", "Medical material", 0),  # con-sistent is no stent
    ("A port catheter is seen in the right atrium.", "Medical material", 1),
    ("Aeration of both lungs is normal. No emphysema.", "Emphysema", 0),
])
def test_negation_uncertainty_and_scope(text, finding, hard):
    prob, h = CT.label(text)
    assert h[finding] == hard, (text, finding, prob[finding])
    if hard == 0:
        assert prob[finding] < 0.5


def test_absent_ranks_between_negated_and_positive():
    p_neg, _ = CT.label("No pleural effusion was observed.")
    p_abs, _ = CT.label("Lungs are clear.")
    p_pos, _ = CT.label("Pleural effusion is present.")
    assert p_neg["Pleural effusion"] < p_abs["Pleural effusion"] < p_pos["Pleural effusion"]


def test_other_label_sets_use_their_synonyms():
    lab = RulesLabeler(load_label_set("fvlm_anatomy"))
    _, h = lab.label("Findings: A sliding hiatal hernia. No aneurysm.\nImpression: Osteophytes in the spine.")
    assert h["Hiatal hernia"] == 1 and h["Aortic dilatation"] == 0 and h["Bone lesion or degeneration"] == 1


def test_dev_reports_meet_the_bars(shared_data, tmp_path):
    """The issue's bar: macro AUC >= 0.92 and macro F1 >= 0.85 on the 800 hand-labelled reports."""
    dev = shared_data / "ctrate_reports_dev.csv"
    out = tmp_path / "rules.parquet"
    r = subprocess.run([sys.executable, "-m", "ctvlp_dist", "label", "--reports", str(dev), "--out", str(out),
                        "--backend", "rules", "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == \
        "reports in: 800 = labelled ok: 800 + failed: 0 + skipped (already labelled): 0"
    r = subprocess.run([sys.executable, "-m", "ctvlp_dist", "label", "eval", "--pred", str(out), "--gold", str(dev),
                        "--json", str(tmp_path / "m.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["macro_auc"] >= 0.92 and m["macro_f1"] >= 0.85, (m["macro_auc"], m["macro_f1"])
    assert "| **macro** |" in r.stdout and len(m["per_finding"]) == 18


def test_synthetic_reports_are_labelled_well(cohort_npy, tmp_path):
    """Our synthetic reports read like CT-RATE's: the dev-tuned rules should read them too."""
    from ctvlp_dist.labels.evaluate import evaluate_labels
    from ctvlp_dist.labels.runner import run_label

    from .conftest import make_cfg

    out = tmp_path / "s.parquet"
    run_label(make_cfg(label=dict(reports=str(cohort_npy), out=str(out))), progress=False)
    m = evaluate_labels(str(out), str(cohort_npy / "ground_truth.csv"))
    assert m["micro_f1"] > 0.9
