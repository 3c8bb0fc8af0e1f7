"""`ctvlp label split`: reports + silver labels -> per-anatomy text (Parquet), resumable.

Columns: the labels file's bookkeeping (key, status, backend, model, settings_hash, tokens,
attempts, raw_output), `sentences` (JSON [[sentence, anatomy], ...]), then per anatomy
`text__<organ>` and `normal__<organ>`. The assignment is the costly part and is what the parts
and the resume keep; the organ texts are derived from it and the silver labels when the file is
written, so new silver labels need no new split. reports in = split OK + failed + skipped.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from data_shards.ingest.masks import load_anatomy_map
from data_shards.label_sets import load_label_set
from ..observe import Exporter
from .accounting import Accounting
from .runner import reports_and_model
from .split import SPLIT_SYSTEM, RulesSplitter, organ_findings, organ_texts, report_sentences, score_split, split_messages
from .store import LabelStore, read_labels

log = logging.getLogger(__name__)


def _schemas(anatomies) -> tuple[pa.Schema, pa.Schema]:
    base = pa.schema([pa.field("key", pa.string()), pa.field("status", pa.string()), pa.field("backend", pa.string()),
                      pa.field("model", pa.string()), pa.field("settings_hash", pa.string()),
                      pa.field("tokens_in", pa.int64()), pa.field("tokens_out", pa.int64()),
                      pa.field("attempts", pa.int32()), pa.field("raw_output", pa.string()),
                      pa.field("sentences", pa.string())])
    organs = [f for a in anatomies for f in (pa.field(f"text__{a}", pa.string()), pa.field(f"normal__{a}", pa.bool_()))]
    return base, pa.schema([*base, *organs])


def _hash(ls, amap, backend: str, model_id: str) -> str:
    """Changes whenever an assignment could: anatomies and words, label set, backend, model,
    prompt, and the rules' source."""
    from . import rules, split

    payload = {"label_set": ls.name, "findings": [(f.name, f.anatomy, f.synonyms) for f in ls.findings],
               "anatomies": amap.anatomies, "words": amap.words, "backend": backend, "model": model_id,
               "system": SPLIT_SYSTEM, "probe": split_messages(["<S>"], amap.anatomies),
               "rules": [Path(m.__file__).read_text() for m in (rules, split)] if backend == "rules" else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _positives(path: str, names: list[str]) -> dict[str, set[str]]:
    rows, _ = read_labels(path)
    return {r["key"]: {n for n in names if r.get(n) == 1} for r in rows if r.get("status") == "ok"}


def run_split(cfg, progress: bool = True) -> dict:
    lc = cfg.label
    if not lc.reports or not lc.out or not lc.silver:
        raise ValueError("ctvlp label split needs --reports SRC, --silver LABELS.parquet (from `ctvlp label`) "
                         "and --out FILE.parquet")
    ls, amap = load_label_set(lc.label_set), load_anatomy_map(lc.anatomy_map)
    findings_of = organ_findings(ls, amap)
    if not any(findings_of.values()):
        raise ValueError(f"label set {ls.name!r} names no finding of the anatomies {list(amap.anatomies)}: "
                         f"give its findings an `anatomy:` (see data_shards/resources/ctrate18.yaml)")
    positives = _positives(lc.silver, ls.names)
    reports, model_path, model_id = reports_and_model(lc)
    h = _hash(ls, amap, lc.backend, model_id)
    base, final = _schemas(amap.anatomies)
    store = LabelStore(lc.out, [], h, schema=base)
    done = store.reusable()
    todo = [(k, t) for k, t in reports if k not in done]
    acct = Accounting(lc.backend, Exporter(cfg.metrics, Path(lc.out).resolve().parent, "label", "split"))
    bar = tqdm(total=len(todo), desc=f"label split ({lc.backend})", unit="report", disable=not progress)
    engines = 1

    def on_rows(rows):
        out = [{"key": r["key"], "status": r["status"], "backend": lc.backend, "model": model_id, "settings_hash": h,
                "tokens_in": int(r.get("tokens_in", 0)), "tokens_out": int(r.get("tokens_out", 0)),
                "attempts": int(r.get("attempts", 1)), "raw_output": r.get("raw", ""),
                "sentences": r.get("sentences", "[]")} for r in rows]
        store.append(out)
        acct.add(rows)
        bar.update(len(rows))

    try:
        if lc.backend == "rules":
            splitter = RulesSplitter(ls, amap)
            for i in range(0, len(todo), 512):
                on_rows([_rules_row(splitter, k, t) for k, t in todo[i:i + 512]])
        elif todo:
            import torch

            from .pool import run_pool

            batches = [todo[i:i + lc.batch_size] for i in range(0, len(todo), lc.batch_size)]
            engines = run_pool(batches, model=model_path, cfg=lc, gpu=torch.cuda.is_available(), on_rows=on_rows,
                               acct=acct, task="split")
    finally:
        bar.close()
    counts = {"no_silver_labels": 0, "abnormal_without_sentences": 0}

    def organ_columns(r: dict) -> dict:
        r = {k: r.get(k) for k in base.names}
        if r["status"] != "ok":
            return r
        if r["key"] not in positives:
            counts["no_silver_labels"] += 1
            r["status"] = "failed: no silver labels for this key"
            return r
        pairs = json.loads(r["sentences"])
        texts, normal, bare = organ_texts([s for s, _ in pairs], [a for _, a in pairs], positives[r["key"]],
                                          findings_of)
        counts["abnormal_without_sentences"] += len(bare)
        for a in amap.anatomies:
            r[f"text__{a}"], r[f"normal__{a}"] = texts[a], normal[a]
        return r

    summary = {"reports_in": len(reports), "skipped_already_split": len(done), "backend": lc.backend,
               "model": model_id, "settings_hash": h, "anatomy_map": amap.name, "anatomies": list(amap.anatomies),
               "engines": engines if lc.backend == "vllm" else 0}
    rows = store.finalize([k for k, _ in reports], {"split": summary}, transform=organ_columns, schema=final)
    summary.update(counts)
    summary["ok"] = sum(r["status"] == "ok" for r in rows)
    summary["failed"] = len(rows) - summary["ok"]
    summary["split_now"] = len(todo)
    summary.update(tokens_in=acct.tokens_in, tokens_out=acct.tokens_out, worker_restarts=acct.worker_restarts)
    if counts["no_silver_labels"]:
        log.warning("%d split reports have no OK silver label row: recorded as failed", counts["no_silver_labels"])
    if counts["abnormal_without_sentences"]:
        log.warning("%d abnormal organs got no sentence: their text is their positive findings' names",
                    counts["abnormal_without_sentences"])
    if lc.truth:
        summary["score"] = score_split(rows, lc.truth, amap.anatomies)
    acct.close(cfg.metrics.linger_s)
    return summary


def _rules_row(splitter: RulesSplitter, key: str, text: str) -> dict:
    sents = report_sentences(text)
    if not sents:
        return {"key": key, "status": "failed: the report has no sentence", "raw": "", "sentences": "[]"}
    pairs = [[s, splitter.assign(s)] for s in sents]
    return {"key": key, "status": "ok", "raw": "", "sentences": json.dumps(pairs)}


def read_split(path: str | Path) -> tuple[list[dict], dict]:
    rows, meta = read_labels(path)
    return rows, meta.get("split", meta)
