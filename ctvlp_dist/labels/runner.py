"""`ctvlp label`: reports -> (skip already-labelled) -> rules | vLLM pool -> labels.parquet.

For every run: reports in = labelled OK + failed (+ skipped, already labelled with the same
settings). The accounting goes to stdout and into the Parquet file's metadata.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

from data_shards.label_sets import load_label_set
from ..observe import Exporter
from .accounting import Accounting
from .prompt import settings_hash
from .sources import read_reports
from .store import LabelStore

log = logging.getLogger(__name__)


def _to_row(r: dict, names, backend: str, model_id: str, h: str, threshold: float, band: float) -> dict:
    row = {"key": r["key"], "status": r["status"], "backend": backend, "model": model_id, "settings_hash": h,
           "tokens_in": int(r.get("tokens_in", 0)), "tokens_out": int(r.get("tokens_out", 0)),
           "attempts": int(r.get("attempts", 1)), "raw_output": r.get("raw", "")}
    hard = r.get("hard")
    for n in names:
        p = r["probs"].get(n)
        row[f"{n}__prob"] = None if p is None else float(p)
        if p is None:
            row[n] = None
        elif hard is not None:
            row[n] = int(hard[n])
        else:
            row[n] = -1 if band > 0 and abs(p - threshold) < band else int(p >= threshold)
    return row


def _rules_rows(todo, ls):
    from .rules import RulesLabeler

    lab = RulesLabeler(ls)
    for key, text in todo:
        if not text or not text.strip():
            yield {"key": key, "probs": {}, "raw": "", "status": "failed: empty report"}
            continue
        prob, hard, found = lab.assess(text)
        evidence = [[m.finding, m.state, m.sentence] for m in found]
        yield {"key": key, "probs": prob, "hard": hard, "raw": json.dumps(evidence), "status": "ok"}


def reports_and_model(lc) -> tuple[list, str | None, str]:
    """The reports to process (label.limit applied), and the model folder and its id for the
    vllm backend (None, "rules" for rules): what `ctvlp label` and `ctvlp label split` share."""
    reports = read_reports(lc.reports, lc.key_column, lc.text_column)
    if lc.limit:
        reports = reports[: lc.limit]
    if lc.backend != "vllm":
        return reports, None, "rules"
    from .model_prep import DEFAULT_MODEL, prepare_model

    model_path = lc.model or str(prepare_model())
    return reports, model_path, os.path.basename(os.path.normpath(model_path)) if lc.model else DEFAULT_MODEL


def run_label(cfg, progress: bool = True) -> dict:
    lc = cfg.label
    if not lc.reports or not lc.out:
        raise ValueError("ctvlp label needs --reports SRC and --out FILE.parquet")
    if lc.backend not in ("rules", "vllm"):
        raise ValueError(f"label.backend must be rules or vllm, got {lc.backend!r}")
    ls = load_label_set(lc.label_set)
    reports, model_path, model_id = reports_and_model(lc)
    h = settings_hash(ls, lc.backend, model_id, lc.scoring if lc.backend == "vllm" else "rules")
    store = LabelStore(lc.out, ls.names, h)
    done = store.reusable()
    todo = [(k, t) for k, t in reports if k not in done]
    acct = Accounting(lc.backend, Exporter(cfg.metrics, Path(lc.out).resolve().parent, "label", "label"))
    bar = tqdm(total=len(todo), desc=f"label ({lc.backend})", unit="report", disable=not progress)
    gpu, engines = False, lc.engines

    def on_rows(rows):
        out = [_to_row(r, ls.names, lc.backend, model_id, h, lc.threshold, lc.uncertain_band) for r in rows]
        store.append(out)
        acct.add(rows)
        bar.update(len(rows))

    try:
        if lc.backend == "rules":
            buf = []
            for r in _rules_rows(todo, ls):
                buf.append(r)
                if len(buf) >= 512:
                    on_rows(buf)
                    buf = []
            on_rows(buf)
        elif todo:
            import torch

            from .pool import run_pool

            gpu = torch.cuda.is_available()
            batches = [todo[i:i + lc.batch_size] for i in range(0, len(todo), lc.batch_size)]
            engines = run_pool(batches, model=model_path, cfg=lc, gpu=gpu, on_rows=on_rows, acct=acct)
    except BaseException:
        acct.close()
        raise
    finally:
        bar.close()
    summary = acct.summary(device=_device(gpu), workers=engines if lc.backend == "vllm" else 1,
                           devices_per_worker=lc.tensor_parallel_size if lc.backend == "vllm" else 1,
                           price_per_device_hour=lc.price_per_gpu_hour)
    summary.update({"reports_in": len(reports), "skipped_already_labelled": len(done), "model": model_id,
                    "settings_hash": h, "label_set": ls.name, "scoring": lc.scoring if lc.backend == "vllm" else "rules"})
    summary["damaged_label_parts"] = list(store.damaged)  # their reports were labelled again
    rows = store.finalize([k for k, _ in reports], {"accounting": summary})
    summary["rows_written"] = len(rows)
    acct.close(cfg.metrics.linger_s)
    return summary


def _device(gpu: bool) -> str:
    if gpu:
        import torch

        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"
