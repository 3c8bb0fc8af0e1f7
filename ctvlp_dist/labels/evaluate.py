"""`ctvlp label eval`: silver labels against hand labels.

AUC uses the probabilities. F1, precision and recall use the hard labels, where uncertain
(-1) is counted as positive by default (`uncertain="positive"`, the CheXpert U-ones policy),
or as negative (`"negative"`), or its reports are left out of that finding (`"ignore"`).
Reports that failed to label are scored as probability 0 / label 0 and counted in `failed`;
gold reports with no row at all in the predictions (a partial run) are left out and counted
in `missing_predictions`.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

from ..records import markdown_table


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half; NaN when one class is absent."""
    y = np.asarray(y, bool)
    s = np.asarray(s, float)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _prf(y, p):
    tp = int((y & p).sum()); fp = int((~y & p).sum()); fn = int((y & ~p).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return prec, rec, f1, tp, fp, fn


def evaluate(gold: dict[str, np.ndarray], pred_prob: dict[str, np.ndarray], pred_hard: dict[str, np.ndarray],
             names: list[str], uncertain: str = "positive", keys: Optional[list[str]] = None, failed: int = 0) -> dict:
    """gold/pred_*: finding -> array aligned over the same reports."""
    if uncertain not in ("positive", "negative", "ignore"):
        raise ValueError("uncertain must be positive, negative or ignore")
    per, tot = {}, np.zeros(3, int)
    for n in names:
        y = np.asarray(gold[n]).astype(int) == 1
        h = np.asarray(pred_hard[n]).astype(int)
        keep = np.ones(len(y), bool) if uncertain != "ignore" else h != -1
        hp = (h == 1) | ((h == -1) & (uncertain == "positive"))
        prec, rec, f1, tp, fp, fn = _prf(y[keep], hp[keep])
        tot += (tp, fp, fn)
        per[n] = {"auc": roc_auc(y, pred_prob[n]), "f1": f1, "precision": prec, "recall": rec,
                  "support": int(y.sum()), "uncertain": int((h == -1).sum())}
    mtp, mfp, mfn = tot
    mp = mtp / (mtp + mfp) if mtp + mfp else 0.0
    mr = mtp / (mtp + mfn) if mtp + mfn else 0.0
    aucs = [v["auc"] for v in per.values() if not np.isnan(v["auc"])]
    return {
        "macro_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "macro_f1": float(np.mean([v["f1"] for v in per.values()])),
        "macro_precision": float(np.mean([v["precision"] for v in per.values()])),
        "macro_recall": float(np.mean([v["recall"] for v in per.values()])),
        "micro_f1": 2 * mp * mr / (mp + mr) if mp + mr else 0.0, "micro_precision": mp, "micro_recall": mr,
        "reports": int(len(next(iter(gold.values())))) if gold else 0, "failed": failed,
        "uncertain_policy": uncertain, "per_finding": per,
    }


def table(res: dict) -> str:
    rows = [{"finding": n, **{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in m.items()}}
            for n, m in res["per_finding"].items()]
    rows.append({"finding": "**macro**", "auc": f"{res['macro_auc']:.3f}", "f1": f"{res['macro_f1']:.3f}",
                 "precision": f"{res['macro_precision']:.3f}", "recall": f"{res['macro_recall']:.3f}"})
    rows.append({"finding": "**micro**", "f1": f"{res['micro_f1']:.3f}", "precision": f"{res['micro_precision']:.3f}",
                 "recall": f"{res['micro_recall']:.3f}"})
    return markdown_table(rows, ["finding", "auc", "f1", "precision", "recall", "support", "uncertain"])


def dumps(res: dict) -> str:
    return json.dumps(res, indent=1, allow_nan=True)


def evaluate_labels(pred: str, gold: str, json_out: Optional[str] = None, uncertain: str = "positive",
             label_set: Optional[str] = None) -> dict:
    """Align a labels Parquet with a gold CSV (key column + one 0/1 column per finding) by key."""
    import csv
    from pathlib import Path

    from data_shards.label_sets import load_label_set
    from data_shards.format import KEY_COLUMNS, strip_volume_ext
    from .store import read_labels

    rows, meta = read_labels(pred)
    ls = load_label_set(label_set or meta.get("accounting", {}).get("label_set", "ctrate18"))
    with open(gold, newline="", encoding="utf-8") as f:
        grows = list(csv.DictReader(f))
    kcol = next((c for c in KEY_COLUMNS if grows and c in grows[0]), None)
    if kcol is None:
        raise ValueError(f"{gold}: no key column ({KEY_COLUMNS})")
    missing = [n for n in ls.names if n not in grows[0]]
    if missing:
        raise ValueError(f"{gold}: no gold column for {missing[:3]}")
    by_key = {r["key"]: r for r in rows}
    all_keys = [strip_volume_ext(r[kcol]) for r in grows]
    # Gold reports that were never submitted (a partial run, --limit) are left out and counted;
    # reports that were submitted but failed stay in, scored as negative.
    keep = [i for i, k in enumerate(all_keys) if k in by_key]
    if not keep:
        raise ValueError(f"none of the {len(all_keys)} gold keys is in {pred}; do the keys match?")
    grows, keys = [grows[i] for i in keep], [all_keys[i] for i in keep]
    absent = len(all_keys) - len(keys)
    failed = sum(1 for k in keys if by_key[k]["status"] != "ok")
    g = {n: np.array([int(float(r[n])) for r in grows]) for n in ls.names}
    prob = {n: np.array([_val(by_key.get(k), f"{n}__prob", 0.0) for k in keys]) for n in ls.names}
    hard = {n: np.array([int(_val(by_key.get(k), n, 0)) for k in keys]) for n in ls.names}
    res = evaluate(g, prob, hard, ls.names, uncertain=uncertain, failed=failed)
    res["missing_predictions"] = absent
    print(table(res))
    print(f"macro AUC {res['macro_auc']:.4f}, macro F1 {res['macro_f1']:.4f} over {res['reports']} reports "
          f"({failed} failed, scored as negative; {absent} gold reports without a prediction left out; "
          f"uncertain counted as {uncertain})")
    if json_out:
        Path(json_out).write_text(dumps(res))
    return res


def _val(row, col, default):
    if row is None or row.get("status") != "ok" or row.get(col) is None:
        return default
    return row[col]
