"""Label metrics against hand-computed values and scikit-learn as an independent reference."""
import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from ctvlp_dist.labels.evaluate import evaluate, roc_auc


def test_auc_hand_computed():
    # positives 0.9, 0.4; negatives 0.4, 0.1: pairs (0.9>0.4)=1, (0.9>0.1)=1, (0.4=0.4)=0.5, (0.4>0.1)=1 -> 3.5/4
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.4, 0.1])) == 0.875
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_auc_matches_sklearn_on_random_ties():
    rng = np.random.default_rng()
    for _ in range(20):
        y = rng.integers(0, 2, 200)
        s = rng.integers(0, 7, 200) / 6  # many ties
        if 0 < y.sum() < 200:
            assert abs(roc_auc(y, s) - roc_auc_score(y, s)) < 1e-12


@pytest.mark.parametrize("policy", ["positive", "negative", "ignore"])
def test_prf_and_uncertain_policies(policy):
    rng = np.random.default_rng()
    y = rng.integers(0, 2, 300)
    hard = rng.choice([1, 0, -1], 300, p=[0.4, 0.45, 0.15])
    res = evaluate({"A": y}, {"A": rng.random(300)}, {"A": hard}, ["A"], uncertain=policy)["per_finding"]["A"]
    keep = hard != -1 if policy == "ignore" else np.ones(300, bool)
    pred = (hard == 1) | ((hard == -1) & (policy == "positive"))
    assert res["f1"] == pytest.approx(f1_score(y[keep], pred[keep]))
    assert res["precision"] == pytest.approx(precision_score(y[keep], pred[keep]))
    assert res["recall"] == pytest.approx(recall_score(y[keep], pred[keep]))
    assert res["support"] == y.sum() and res["uncertain"] == (hard == -1).sum()


def test_macro_and_micro():
    g = {"A": np.array([1, 1, 0, 0]), "B": np.array([1, 0, 0, 0])}
    h = {"A": np.array([1, 0, 0, 0]), "B": np.array([1, 1, 0, 0])}
    p = {k: v.astype(float) for k, v in h.items()}
    r = evaluate(g, p, h, ["A", "B"])
    # A: tp1 fp0 fn1 -> f1 2/3; B: tp1 fp1 fn0 -> f1 2/3; micro: tp2 fp1 fn1 -> 2/3
    assert r["macro_f1"] == pytest.approx(2 / 3) and r["micro_f1"] == pytest.approx(2 / 3)
    assert r["macro_auc"] == pytest.approx((0.75 + 5 / 6) / 2)
