"""Classification metrics for zero-shot diagnosis, written out so that each is checkable by hand.

AUC is the Mann-Whitney statistic (ties count one half), equal to scikit-learn's roc_auc_score.
The operating point is the ROC point closest to (0, 1) (the seed paper's choice), at which F1,
sensitivity, specificity and precision are reported. The macro AUC's confidence interval comes
from a patient-level-agnostic bootstrap over samples.
"""
from __future__ import annotations

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted 1/2; NaN when
    only one class is present."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    r = _ranks(s)
    return float((r[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score, predicting positive when s >= t,
    starting at (0, 0) with threshold +inf."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    last = np.r_[np.nonzero(np.diff(ss))[0], len(ss) - 1]  # the last index of each distinct score
    tp = np.cumsum(ys)[last]
    fp = (last + 1) - tp
    pos, neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos], np.r_[np.inf, ss[last]]


def binary_metrics(y: np.ndarray, pred: np.ndarray) -> dict:
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    tp, fp = int((y & pred).sum()), int((~y & pred).sum())
    fn, tn = int((y & ~pred).sum()), int((~y & ~pred).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"f1": f1, "sensitivity": sens, "specificity": spec, "precision": prec, "tp": tp, "fp": fp, "fn": fn,
            "tn": tn}


def closest_point_metrics(y: np.ndarray, s: np.ndarray) -> dict:
    """Metrics at the threshold whose ROC point is closest to (0, 1) (first one on ties)."""
    fpr, tpr, thr = roc_curve(y, s)
    d = np.hypot(fpr[1:], 1 - tpr[1:])  # the +inf threshold predicts nothing; never the choice
    t = float(thr[1:][int(np.argmin(d))])
    return {"threshold": t, **binary_metrics(y, np.asarray(s) >= t)}


def macro_auc(Y: np.ndarray, S: np.ndarray) -> float:
    """Mean AUC over the columns that have both classes."""
    aucs = [roc_auc(Y[:, j], S[:, j]) for j in range(Y.shape[1])]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def bootstrap_macro_auc(Y: np.ndarray, S: np.ndarray, resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict:
    """Percentile bootstrap interval of the macro AUC, resampling samples with replacement."""
    rng = np.random.default_rng(seed)
    n = Y.shape[0]
    vals = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        v = macro_auc(Y[idx], S[idx])
        if not np.isnan(v):
            vals.append(v)
    if not vals:
        return {"low": float("nan"), "high": float("nan"), "resamples": 0}
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return {"low": float(lo), "high": float(hi), "resamples": len(vals), "level": level}
