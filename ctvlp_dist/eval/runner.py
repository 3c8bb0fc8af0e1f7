"""`ctvlp eval`: an exported model on one split -> metrics.json, report.md and plots.

metrics.json holds, at its top level, zero_shot (macro_auc, its bootstrap interval, weighted
operating-point metrics, per finding), retrieval.image_image (map_at_K, and the published
script's running-average figures under published_running_average_map_at_K), retrieval.report_image
(recall_at_K) and, optionally, linear_probe.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..records import markdown_table
from .metrics import bootstrap_macro_auc, closest_point_metrics, roc_auc
from .retrieval import map_at_k, published_map_at_k, recall_at_k
from .zero_shot import prompt_embeddings, zero_shot_scores

log = logging.getLogger(__name__)
OP_KEYS = ("f1", "sensitivity", "specificity", "precision")


def _binary(labels: np.ndarray, uncertain: str) -> tuple[np.ndarray, np.ndarray]:
    """Reference labels -> (0/1 matrix, mask of known entries): -1 counts as `uncertain`, NaN is unknown."""
    known = ~np.isnan(labels)
    y = np.where(labels == -1, 1.0 if uncertain == "positive" else 0.0, np.nan_to_num(labels))
    return (y > 0).astype(np.int64), known


def zero_shot_metrics(Y: np.ndarray, known: np.ndarray, S: np.ndarray, names: list[str], resamples: int,
                      seed: int) -> dict:
    per, aucs = {}, []
    for j, n in enumerate(names):
        m = known[:, j]
        a = roc_auc(Y[m, j], S[m, j])
        aucs.append(a)
        row = {"auc": a, "support": int(Y[m, j].sum()), "n": int(m.sum())}
        if not np.isnan(a):
            row.update({k: v for k, v in closest_point_metrics(Y[m, j], S[m, j]).items() if k in OP_KEYS + ("threshold",)})
        per[n] = row
    valid = [n for n, a in zip(names, aucs) if not np.isnan(a)]
    sup = np.array([per[n]["support"] for n in valid], dtype=np.float64)
    weighted = {k: float(np.average([per[n][k] for n in valid], weights=sup)) if sup.sum() else float("nan")
                for k in OP_KEYS}
    out = {"macro_auc": float(np.mean([per[n]["auc"] for n in valid])) if valid else float("nan"),
           "findings_scored": len(valid), "weighted": weighted, "per_finding": per}
    if resamples:
        cols = [names.index(n) for n in valid]
        out["macro_auc_ci95"] = bootstrap_macro_auc(Y[:, cols], S[:, cols], resamples, seed)
    return out


def organ_zero_shot(emb: dict, S: np.ndarray, known: np.ndarray, pos, neg, scale: float, organs: list[str],
                    label_set, min_inside: float) -> dict:
    """fVLM's evaluation, in place on S and known: a finding of an organ is scored on that organ's
    embedding; a volume whose organ is under `min_inside` inside the evaluated crop is skipped
    for that organ's findings (fVLM: 90%). Whole-report findings keep the global embedding.
    -> {organ: {"findings": [...], "skipped_volumes": n}}."""
    out = {a: {"findings": [], "skipped_volumes": int((emb["inside"][:, k] < min_inside).sum())}
           for k, a in enumerate(organs)}
    out["global"] = {"findings": [], "skipped_volumes": 0}
    for j, f in enumerate(label_set.findings):
        if f.anatomy not in organs:
            out["global"]["findings"].append(f.name)
            continue
        k = organs.index(f.anatomy)
        S[:, j] = zero_shot_scores(emb["organs"][:, k], pos[j:j + 1], neg[j:j + 1], scale)[:, 0].numpy()
        known[emb["inside"][:, k] < min_inside, j] = False
        out[f.anatomy]["findings"].append(f.name)
    return {a: v for a, v in out.items() if v["findings"]}


def organ_summary(zs: dict, per_organ: dict) -> dict:
    """Per organ: the macro AUC of its findings (those with both classes), and what was skipped."""
    out = {}
    for a, v in per_organ.items():
        aucs = [zs["per_finding"][f]["auc"] for f in v["findings"] if not np.isnan(zs["per_finding"][f]["auc"])]
        out[a] = {**v, "macro_auc": float(np.mean(aucs)) if aucs else float("nan")}
    return out


def linear_probe(train: dict, test: dict, Ytr: np.ndarray, Yte: np.ndarray, names: list[str], seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    per = {}
    for j, n in enumerate(names):
        if len(np.unique(Ytr[:, j])) < 2 or len(np.unique(Yte[:, j])) < 2:
            continue
        clf = LogisticRegression(max_iter=2000, random_state=seed).fit(train["image"].numpy(), Ytr[:, j])
        per[n] = roc_auc(Yte[:, j], clf.predict_proba(test["image"].numpy())[:, 1])
    return {"macro_auc": float(np.mean(list(per.values()))) if per else float("nan"), "per_finding_auc": per}


def reference_labels(gold, data: str, silver) -> tuple[str, str]:
    """The labels to score against and what they are: `gold` when given, else the dataset's
    ground_truth.csv (both "gold"), else the training labels ("silver"), which the report and
    metrics.json then flag, since a score against silver labels measures agreement with the labeler."""
    if gold:
        return str(gold), "gold"
    truth = Path(data) / "ground_truth.csv"
    if truth.exists():
        return str(truth), "gold"
    if silver:
        return str(silver), "silver"
    raise ValueError("no reference labels: give --gold (eval.gold: a CSV/Parquet keyed by sample)")


def evaluate_model(cfg, progress: bool = True) -> dict:
    import torch

    from data_shards.label_sets import load_label_set
    from ..models.export import load_exported
    from . import plots
    from .embed import embed_split, resolve_checkpoint

    ev = cfg.eval
    if not ev.data:
        raise ValueError("eval.data is empty: give the shard dataset folder")
    out = Path(ev.out)
    out.mkdir(parents=True, exist_ok=True)
    labels, source = reference_labels(ev.gold, ev.data, cfg.loader.labels)
    if source == "silver":
        log.warning("evaluating against the training labels %s (silver), not gold labels: give --gold", labels)
    names = load_label_set(ev.label_set).names
    torch.manual_seed(ev.seed)
    model = load_exported(resolve_checkpoint(ev.checkpoint))
    emb = embed_split(model, ev.data, cfg.loader, ev.split, labels, names, ev.batch_size, progress)
    Y, known = _binary(emb["labels"], ev.uncertain)
    with torch.no_grad():
        pos, neg = prompt_embeddings(lambda t: model("text", model.text.tokenize(t)), names, ensemble=ev.ensemble,
                                     template=ev.template)
        S = zero_shot_scores(emb["image"], pos, neg, float(model.scale())).numpy()
        per_organ = None
        if emb["organs"] is not None:
            per_organ = organ_zero_shot(emb, S, known, pos, neg, float(model.scale()), list(model.anatomies),
                                        load_label_set(ev.label_set), ev.organ_min_inside)
    zs = zero_shot_metrics(Y, known, S, names, ev.bootstrap, ev.seed)
    if per_organ is not None:
        zs["per_organ"] = organ_summary(zs, per_organ)
    n = len(emb["keys"])
    img_map = map_at_k(Y, emb["image"], ev.map_ks)
    pub_map = published_map_at_k(Y, emb["image"], ev.map_ks)
    rec = recall_at_k(emb["report"], emb["image"], ev.recall_ks)
    metrics = {
        "checkpoint": str(resolve_checkpoint(ev.checkpoint)), "data": ev.data, "split": ev.split, "samples": n,
        "labels": labels, "labels_source": source, "zero_shot": zs,
        "retrieval": {
            "image_image": {**{f"map_at_{k}": v for k, v in img_map.items()},
                            **{f"published_running_average_map_at_{k}": v for k, v in pub_map.items()}},
            "report_image": {f"recall_at_{k}": v for k, v in rec.items()}},
    }
    if ev.linear_probe:
        tr = embed_split(model, ev.data, cfg.loader, ev.probe_split, labels, names, ev.batch_size, progress)
        Ytr, _ = _binary(tr["labels"], ev.uncertain)
        metrics["linear_probe"] = linear_probe(tr, emb, Ytr, Y, names, ev.seed)
    aucs = [zs["per_finding"][nm]["auc"] for nm in names]
    figs = {"roc": plots.roc_grid(Y, S, names, aucs, out / "roc_curves.png"),
            "auc": plots.auc_bars(names, aucs, zs["macro_auc"], out / "auc_per_finding.png"),
            "loss": plots.loss_curves(list(ev.runs), out / "loss_curves.png")}
    metrics["plots"] = {k: str(v) for k, v in figs.items() if v}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "report.md").write_text(render_report(metrics, names, ev, {k: v.name for k, v in figs.items() if v}))
    return metrics


def _f(v, pct=False):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return f"{v:.1%}" if pct else f"{v:.3f}"


def render_report(m: dict, names: list[str], ev, figs: dict) -> str:
    zs = m["zero_shot"]
    ci = zs.get("macro_auc_ci95")
    ci_s = f" (95% CI {_f(ci['low'])}-{_f(ci['high'])}, {ci['resamples']} bootstrap resamples)" if ci else ""
    lines = [f"# Evaluation: {m['split']} split, {m['samples']} volumes", ""]
    if m.get("labels_source") == "silver":
        lines += [f"> **Warning: scored against silver labels** (`{m['labels']}`, the training labels), not gold "
                  "ones: these figures measure agreement with the labeler. Give `--gold` for a real evaluation.", ""]
    lines += [
             f"Model `{m['checkpoint']}`; data `{m['data']}`; reference labels `{m['labels']}`.", "",
             "## Zero-shot diagnosis", "",
             f"Prompts: {'ensemble of the four template pairs' if ev.ensemble else f'template {ev.template}'}; "
             "score = softmax over the positive/negative pair. Operating point: the ROC point closest to (0, 1).", "",
             f"**Macro AUC {_f(zs['macro_auc'])}**{ci_s} over {zs['findings_scored']} findings with both classes.", ""]
    rows = [{"finding": n, "AUC": _f(r["auc"]), "F1": _f(r.get("f1")), "sensitivity": _f(r.get("sensitivity")),
             "specificity": _f(r.get("specificity")), "precision": _f(r.get("precision")),
             "positives": f"{r['support']}/{r['n']}"} for n, r in zs["per_finding"].items()]
    w = zs["weighted"]
    rows.append({"finding": "**weighted**", "AUC": "", "F1": _f(w["f1"]), "sensitivity": _f(w["sensitivity"]),
                 "specificity": _f(w["specificity"]), "precision": _f(w["precision"]), "positives": ""})
    lines += [markdown_table(rows, ["finding", "AUC", "F1", "sensitivity", "specificity", "precision", "positives"]), ""]
    if "per_organ" in zs:
        lines += ["### Per organ (fVLM: each finding scored on its organ's embedding)", "",
                  f"A volume whose organ lies under {ev.organ_min_inside:.0%} inside the evaluated crop is skipped for "
                  "that organ's findings; `global`: findings judged on the whole-volume embedding.", "",
                  markdown_table([{"organ": a, "macro AUC": _f(v["macro_auc"]), "findings": len(v["findings"]),
                                   "skipped volumes": v["skipped_volumes"]} for a, v in zs["per_organ"].items()],
                                 ["organ", "macro AUC", "findings", "skipped volumes"]), ""]
    for key, title in (("auc", "AUC per finding"), ("roc", "ROC curves"), ("loss", "Training loss")):
        if key in figs:
            lines += [f"![{title}]({figs[key]})", ""]
    ii, ri = m["retrieval"]["image_image"], m["retrieval"]["report_image"]
    lines += ["## Image-to-image retrieval (MAP@K, mean Jaccard of label vectors over the top K)", "",
              "Gallery: volumes with at least one positive finding. \"published script\" reproduces the CT-CLIP "
              "script's figures, whose running average is not reset between K values; the first row is the "
              "correct one.", "",
              markdown_table([{"": "MAP@K (correct)", **{f"K={k}": _f(ii[f'map_at_{k}']) for k in ev.map_ks}},
                              {"": "published script (running average bug)",
                               **{f"K={k}": _f(ii[f'published_running_average_map_at_{k}']) for k in ev.map_ks}}],
                             [""] + [f"K={k}" for k in ev.map_ks]), "",
              "## Report-to-image retrieval (Recall@K)", "",
              markdown_table([{f"K={k}": _f(ri[f'recall_at_{k}']) for k in ev.recall_ks}],
                             [f"K={k}" for k in ev.recall_ks]), ""]
    if "linear_probe" in m:
        lp = m["linear_probe"]
        lines += ["## Linear probe (logistic regression on frozen image embeddings)", "",
                  f"Macro AUC {_f(lp['macro_auc'])}.", "",
                  markdown_table([{"finding": k, "AUC": _f(v)} for k, v in lp["per_finding_auc"].items()],
                                 ["finding", "AUC"]), ""]
    return "\n".join(lines)
