"""Every metric ctvlp exports: name, type, unit, labels and meaning, in one table.

Names follow Prometheus conventions (`ctvlp_<part>_<what>_<unit>`; a counter's exposed name ends
in `_total`). The labels listed here are the metric's own; every series also carries the target
labels `job`, `rank`, `node` and `stage` from the discovery file (observe/discovery.py). The
README's "Observing a run" table is `markdown()` of this table, and a test keeps them equal.
vLLM's engine statistics are re-exported under vLLM's own names (observe/vllm_stats.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MetricDef:
    name: str  # as exposed (counters with _total)
    kind: Literal["counter", "gauge", "histogram"]
    unit: str
    labels: tuple[str, ...]
    help: str

    @property
    def part(self) -> str:
        return self.name.split("_")[1]


M = MetricDef
METRICS: tuple[MetricDef, ...] = (
    # training, every rank
    M("ctvlp_train_loss", "gauge", "", (), "Loss of the last step, mean over all ranks"),
    M("ctvlp_train_loss_max", "gauge", "", (), "Loss of the last step, max over the ranks' own losses"),
    M("ctvlp_train_grad_norm", "gauge", "", (), "Global gradient norm of the last step (NaN when the engine does not compute it)"),
    M("ctvlp_train_lr", "gauge", "", (), "Learning rate"),
    M("ctvlp_train_logit_scale", "gauge", "", (), "CLIP logit scale (0 in the supervised stage)"),
    M("ctvlp_train_steps_total", "counter", "", (), "Optimizer steps done, continued across resumes"),
    M("ctvlp_train_samples_total", "counter", "", (), "Samples this rank trained on, continued across resumes"),
    M("ctvlp_train_samples_per_second", "gauge", "1/s", (), "Samples per second of the last step, all ranks"),
    M("ctvlp_train_scans_per_second_per_worker", "gauge", "1/s", (), "Scans per second of the last step on this rank"),
    M("ctvlp_train_step_seconds", "gauge", "s", ("phase",), "Seconds of the last step by phase (data, forward, backward, optimizer)"),
    M("ctvlp_train_data_wait_ratio", "gauge", "ratio", (), "Share of the last step spent waiting on the loader"),
    M("ctvlp_train_tflops", "gauge", "TFLOP/s", (), "Image-tower TFLOP/s achieved on this rank"),
    M("ctvlp_train_mfu", "gauge", "ratio", (), "Model FLOPs utilisation of the image tower (0 when the device peak is unknown)"),
    M("ctvlp_train_memory_max_active_bytes", "gauge", "bytes", (), "Peak active device memory (host peak RSS on CPU)"),
    M("ctvlp_train_memory_max_reserved_bytes", "gauge", "bytes", (), "Peak memory reserved by the caching allocator (host peak RSS on CPU)"),
    M("ctvlp_train_alloc_retries_total", "counter", "", (), "Allocations the CUDA caching allocator retried after freeing its cache"),
    M("ctvlp_train_ooms_total", "counter", "", (), "Out-of-memory errors the CUDA allocator raised"),
    M("ctvlp_train_checkpoints_total", "counter", "", (), "Checkpoints written, continued across resumes"),
    M("ctvlp_train_checkpoint_seconds_total", "counter", "s", (), "Seconds spent writing checkpoints"),
    # the loader, every training rank
    M("ctvlp_loader_samples_total", "counter", "", (), "Samples the loader handed to this rank"),
    M("ctvlp_loader_wait_seconds_total", "counter", "s", (), "Seconds this rank waited on the loader"),
    # silver labels (the label job's driver)
    M("ctvlp_label_reports_total", "counter", "", ("status",), "Reports labelled, by status (ok, failed)"),
    M("ctvlp_label_tokens_total", "counter", "", ("kind",), "Tokens processed, by kind (prompt, generated)"),
    M("ctvlp_label_failures_total", "counter", "", ("reason",), "Reports that failed, by reason"),
    M("ctvlp_label_retries_total", "counter", "", (), "Batches sent again after their engine died"),
    M("ctvlp_label_queue_depth", "gauge", "", (), "Batches waiting for an engine"),
    M("ctvlp_label_engine_restarts_total", "counter", "", (), "Engine workers that died and were restarted"),
    M("ctvlp_label_seconds_per_report", "histogram", "s", (), "Engine seconds per report"),
    # ingest and synthesis (the writer)
    M("ctvlp_ingest_cases_total", "counter", "", ("outcome",), "Cases read, by outcome (written, rejected)"),
    M("ctvlp_ingest_rejects_total", "counter", "", ("reason",), "Cases rejected, by reason"),
)
BY_NAME = {m.name: m for m in METRICS}
PARTS = {"train": ("train", "loader"), "label": ("label",), "ingest": ("ingest",)}

# Reasons are a fixed vocabulary, so a dashboard can name them and every series exists at 0 from
# the start (a counter with labels has no series until a label value is used). First match wins.
FAILURE_REASONS = {"empty_report": ("empty report", "no sentence"), "no_silver_labels": ("silver labels",),
                   "no_logprobs": ("logprobs",), "engine_dead": ("dead", "died", "restarts exhausted"),
                   "unparsable": ("attempt",), "other": ()}
REJECT_REASONS = {"mask": ("mask",), "no_report": ("report",), "not_ct": ("not ct", "hounsfield", "modality"),
                  "bad_values": ("nan", "infinite"),
                  "geometry": ("spacing", "shape", "slice", "series", "3d volume", "too small"),
                  "duplicate": ("duplicate sample key",),
                  "unreadable": ("readable", "cannot assemble", "not a nifti", "corrupt"), "other": ()}
LABEL_VALUES = {"status": ("ok", "failed"), "kind": ("prompt", "generated"), "outcome": ("written", "rejected"),
                "phase": ("data", "forward", "backward", "optimizer")}


def classify(text: str, reasons: dict) -> str:
    """A free-text failure or reject message -> its reason in the vocabulary."""
    low = text.lower()
    return next((r for r, words in reasons.items() if any(w in low for w in words)), "other")


def build(registry, part: str) -> dict:
    """The prometheus_client objects of one job kind (`PARTS`), by exposed name."""
    from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

    disable_created_metrics()  # no `_created` series beside every counter and histogram
    kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
    out = {}
    for m in METRICS:
        if m.part not in PARTS[part]:
            continue
        name = m.name[: -len("_total")] if m.kind == "counter" else m.name  # the client appends _total
        kw = {"buckets": (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)} if m.kind == "histogram" else {}
        metric = out[m.name] = kinds[m.kind](name, m.help, list(m.labels), registry=registry, **kw)
        if m.labels:
            (label,) = m.labels
            vocab = {"ctvlp_label_failures_total": FAILURE_REASONS, "ctvlp_ingest_rejects_total": REJECT_REASONS}
            for value in vocab[m.name] if m.name in vocab else LABEL_VALUES[label]:
                metric.labels(value)
    return out


def markdown() -> str:
    rows = ["| metric | type | unit | labels | meaning |", "|---|---|---|---|---|"]
    rows += [f"| `{m.name}` | {m.kind} | {m.unit or '-'} | {', '.join(m.labels) or '-'} | {m.help} |" for m in METRICS]
    return "\n".join(rows)
