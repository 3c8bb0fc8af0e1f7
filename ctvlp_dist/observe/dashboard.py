"""The Grafana dashboard (`dashboards/ctvlp.json`, importable as it is), built from one list of
panels so that its PromQL and the metric catalog cannot drift apart: `python -m
ctvlp_dist.observe.dashboard` rewrites the file, and a test checks it is current and that every
expression returns series from a real Prometheus."""
from __future__ import annotations

import json
from pathlib import Path

PATH = Path(__file__).resolve().parents[2] / "dashboards" / "ctvlp.json"
J = 'job=~"$job"'

# row -> panels: (title, unit, [(expr, legend)])
ROWS = {
    "Training": [
        ("Loss (mean over ranks, and the largest rank's)", "none",
         [(f"max by (job) (ctvlp_train_loss{{{J}}})", "{{job}} mean"),
          (f"max by (job) (ctvlp_train_loss_max{{{J}}})", "{{job}} max over ranks")]),
        ("Gradient norm", "none", [(f"max by (job) (ctvlp_train_grad_norm{{{J}}})", "{{job}}")]),
        ("Learning rate and logit scale", "none",
         [(f"max by (job) (ctvlp_train_lr{{{J}}})", "{{job}} lr"),
          (f"max by (job) (ctvlp_train_logit_scale{{{J}}})", "{{job}} logit scale")]),
        ("Samples per second (all ranks)", "reqps",
         [(f"sum by (job) (rate(ctvlp_train_samples_total{{{J}}}[1m]))", "{{job}}")]),
        ("Scans per second per worker", "reqps",
         [(f"ctvlp_train_scans_per_second_per_worker{{{J}}}", "{{job}} rank {{rank}}")]),
        ("MFU and TFLOP/s per rank", "percentunit",
         [(f"ctvlp_train_mfu{{{J}}}", "{{job}} rank {{rank}} MFU"),
          (f"ctvlp_train_tflops{{{J}}}", "{{job}} rank {{rank}} TFLOP/s")]),
        ("Step time by phase", "s", [(f"avg by (job, phase) (ctvlp_train_step_seconds{{{J}}})", "{{job}} {{phase}}")]),
        ("Memory (max active and reserved)", "bytes",
         [(f"max by (job, rank) (ctvlp_train_memory_max_active_bytes{{{J}}})", "{{job}} rank {{rank}} active"),
          (f"max by (job, rank) (ctvlp_train_memory_max_reserved_bytes{{{J}}})", "{{job}} rank {{rank}} reserved")]),
        ("OOMs and allocation retries", "none",
         [(f"sum by (job) (ctvlp_train_ooms_total{{{J}}})", "{{job}} OOMs"),
          (f"sum by (job) (ctvlp_train_alloc_retries_total{{{J}}})", "{{job}} allocation retries")]),
        ("Checkpoints", "none",
         [(f"max by (job) (ctvlp_train_checkpoints_total{{{J}}})", "{{job}} written"),
          (f"max by (job) (ctvlp_train_checkpoint_seconds_total{{{J}}})", "{{job}} seconds")]),
    ],
    "Data": [
        ("Loader samples per second", "reqps",
         [(f"sum by (job) (rate(ctvlp_loader_samples_total{{{J}}}[1m]))", "{{job}}")]),
        ("Share of the step waiting on data", "percentunit",
         [(f"avg by (job) (ctvlp_train_data_wait_ratio{{{J}}})", "{{job}}"),
          (f"sum by (job) (rate(ctvlp_loader_wait_seconds_total{{{J}}}[1m])) / "
           f"count by (job) (ctvlp_loader_wait_seconds_total{{{J}}})", "{{job}} wait s/s per rank")]),
        ("Ingest and synthesis: cases per second", "reqps",
         [(f"sum by (job, outcome) (rate(ctvlp_ingest_cases_total{{{J}}}[1m]))", "{{job}} {{outcome}}")]),
        ("Rejected cases by reason", "none",
         [(f"sum by (job, reason) (ctvlp_ingest_rejects_total{{{J}}})", "{{job}} {{reason}}")]),
    ],
    "Labels": [
        ("Reports per second", "reqps",
         [(f"sum by (job, status) (rate(ctvlp_label_reports_total{{{J}}}[1m]))", "{{job}} {{status}}")]),
        ("Tokens per second", "reqps",
         [(f"sum by (job, kind) (rate(ctvlp_label_tokens_total{{{J}}}[1m]))", "{{job}} {{kind}}")]),
        ("Failures by reason", "none",
         [(f"sum by (job, reason) (ctvlp_label_failures_total{{{J}}})", "{{job}} {{reason}}")]),
        ("Queue, retries and engine restarts", "none",
         [(f"sum by (job) (ctvlp_label_queue_depth{{{J}}})", "{{job}} batches queued"),
          (f"sum by (job) (ctvlp_label_retries_total{{{J}}})", "{{job}} retries"),
          (f"sum by (job) (ctvlp_label_engine_restarts_total{{{J}}})", "{{job}} restarts")]),
        ("Engine seconds per report (p50, p90)", "s",
         [(f"histogram_quantile(0.5, sum by (job, le) (rate(ctvlp_label_seconds_per_report_bucket{{{J}}}[1m])))",
           "{{job}} p50"),
          (f"histogram_quantile(0.9, sum by (job, le) (rate(ctvlp_label_seconds_per_report_bucket{{{J}}}[1m])))",
           "{{job}} p90")]),
        ("vLLM requests running and waiting", "none",
         [(f'sum by (job, model_name) (vllm:num_requests_running{{{J}}})', "{{job}} running"),
          (f'sum by (job, model_name) (vllm:num_requests_waiting{{{J}}})', "{{job}} waiting")]),
        ("vLLM KV-cache usage", "percentunit",
         [(f'max by (job, worker) (vllm:kv_cache_usage_perc{{{J}}})', "{{job}} worker {{worker}}")]),
        ("vLLM tokens per second", "reqps",
         [(f'sum by (job) (rate(vllm:prompt_tokens_total{{{J}}}[1m]))', "{{job}} prompt"),
          (f'sum by (job) (rate(vllm:generation_tokens_total{{{J}}}[1m]))', "{{job}} generated")]),
    ],
    "Cluster": [
        ("Targets up", "none", [(f"sum by (job, stage) (up{{{J}}})", "{{job}} {{stage}}")]),
        ("Ray node CPU", "percent", [(f"avg by (job, node) (ray_node_cpu_utilization{{{J}}})", "{{job}} {{node}}")]),
        ("Ray node memory used", "bytes", [(f"max by (job, node) (ray_node_mem_used{{{J}}})", "{{job}} {{node}}")]),
    ],
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def expressions() -> list[str]:
    return [e for panels in ROWS.values() for _, _, targets in panels for e, _ in targets]


def build() -> dict:
    panels, y, pid = [], 0, 1
    for row, items in ROWS.items():
        panels.append({"id": pid, "type": "row", "title": row, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, (title, unit, targets) in enumerate(items):
            panels.append({
                "id": pid, "type": "timeseries", "title": title, "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [{"refId": chr(65 + k), "datasource": DATASOURCE, "expr": e, "legendFormat": leg}
                            for k, (e, leg) in enumerate(targets)]})
            pid += 1
        y += 8 * ((len(items) + 1) // 2)
    return {
        "title": "ctvlp_dist", "uid": "ctvlp-dist", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "tags": ["ctvlp"],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "job", "type": "query", "datasource": DATASOURCE, "query": "label_values(up, job)",
             "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*", "label": "job",
             "current": {"text": "All", "value": "$__all"}}]},
        "panels": panels,
    }


if __name__ == "__main__":
    PATH.parent.mkdir(parents=True, exist_ok=True)
    PATH.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {PATH}")
