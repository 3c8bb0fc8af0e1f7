"""Observability: the metric catalog is what the exporters serve and what the README documents;
the dashboard is current and well formed, and each of its expressions is run against a real
Prometheus by the test of the job that feeds it (here: ingest; training and cluster in
test_train_ray.py; labels and vLLM in test_label_vllm.py)."""
import json
import re
import subprocess
import sys
import threading
import time

import pytest

from .conftest import ROOT, run_ctvlp
from .prom import Prometheus, dashboard_exprs

# which test feeds which of the dashboard's expressions (by the metric names in them)
FED_BY = {"test_observe.py": ("ctvlp_ingest_",),
          "test_train_ray.py": ("ctvlp_train_", "ctvlp_loader_", "ray_node_", "up{"),
          "test_label_vllm.py": ("ctvlp_label_", "vllm:")}


def test_exporters_serve_exactly_the_catalog_and_the_readme_documents_it():
    from prometheus_client import CollectorRegistry, generate_latest

    from ctvlp_dist.observe import catalog

    served = set()
    for part in catalog.PARTS:
        reg = CollectorRegistry()
        catalog.build(reg, part)
        text = generate_latest(reg).decode()
        families = set(re.findall(r"^# TYPE (\S+) (\w+)", text, re.M))
        for name, kind in families:
            exposed = name + "_total" if kind == "counter" and not name.endswith("_total") else name
            assert catalog.BY_NAME[exposed].kind == kind, (exposed, kind)
            served.add(exposed)
        assert "_created" not in text  # no creation-time series beside the counters
    assert served == set(catalog.BY_NAME)
    for m in catalog.METRICS:
        assert re.fullmatch(r"ctvlp_(train|loader|label|ingest)_[a-z_]+", m.name), m.name
        assert m.name.endswith("_total") == (m.kind == "counter"), m.name
        assert m.unit != "s" or "seconds" in m.name, m.name
        assert m.unit != "bytes" or m.name.endswith("_bytes"), m.name
    assert catalog.markdown() in (ROOT / "README.md").read_text()
    assert catalog.classify("failed: every engine worker is dead (restarts exhausted)", catalog.FAILURE_REASONS) == \
        "engine_dead"
    assert catalog.classify("duplicate sample key", catalog.REJECT_REASONS) == "duplicate"


def test_dashboard_is_current_and_importable():
    from ctvlp_dist.observe import catalog
    from ctvlp_dist.observe.dashboard import PATH, build, expressions

    board = json.loads(PATH.read_text())
    assert board == build(), "dashboards/ctvlp.json is stale: python -m ctvlp_dist.observe.dashboard"
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Training", "Data", "Labels", "Cluster"]
    (job,) = [v for v in board["templating"]["list"] if v["name"] == "job"]
    assert job["type"] == "query" and job["includeAll"] and job["datasource"]["type"] == "prometheus"
    ids = set()
    for p in board["panels"]:
        assert p["id"] not in ids and {"h", "w", "x", "y"} <= set(p["gridPos"])
        ids.add(p["id"])
        if p["type"] == "timeseries":
            assert p["datasource"]["type"] == "prometheus" and "unit" in p["fieldConfig"]["defaults"]
            assert p["targets"] and all(t["expr"] and t["legendFormat"] and '$job' in t["expr"] for t in p["targets"])
    known = set(catalog.BY_NAME) | {"up"}
    for e in expressions():
        names = {n for n in re.findall(r"\b(ctvlp_[a-z_]+)", e)}
        assert all(n in known or n.removesuffix("_bucket") in known for n in names), e
        assert sum(any(p in e for p in ps) for ps in FED_BY.values()) >= 1, f"no test runs {e}"


def test_a_synth_job_is_scraped_through_its_discovery_file(tmp_path):
    """A real Prometheus (1 s scrapes) finds the synth job's exporter through the run folder's
    discovery file, with its target labels, and the dashboard's ingest expressions return series."""
    out = tmp_path / "synth"
    prom = Prometheus([out], tmp_path / "prom")
    try:
        run_ctvlp("synth", "--quiet", f"synth.out={out}", "synth.patients=400", "synth.shape=[8,16,16]",
                  "synth.spacing=[36,22.5,22.5]", "synth.workers=1", "metrics.linger_s=6")
        series = prom.wait_for('ctvlp_ingest_cases_total{outcome="written"}', timeout=30)
        labels = series[0]["metric"]
        assert labels["job"] == "synth" and labels["stage"] == "synth" and labels["rank"] == "0" and labels["node"]
        assert max(prom.values('max(ctvlp_ingest_cases_total{outcome="written"})')) == 400
        for e in dashboard_exprs(FED_BY["test_observe.py"]):
            assert prom.range(e), f"no series: {e}"
        assert not list((out / "metrics" / "targets").glob("*.json"))  # removed when the job ended
    finally:
        prom.close()


def test_observe_prints_the_scrape_config_and_serves_it(tmp_path):
    run = tmp_path / "run"
    p = run_ctvlp("observe", str(run))
    assert (run / "metrics" / "targets").is_dir()  # watched from the start
    assert "file_sd_configs" in p.stdout and str(run.resolve() / "metrics" / "targets" / "*.json") in p.stdout
    from ctvlp_dist.observe.discovery import prometheus_binary

    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed")
    from .conftest import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ctvlp_dist", "observe", str(run), "--serve", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import urllib.request

        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status/config", timeout=1).read()
                break
            except OSError:
                time.sleep(0.3)
        assert b"file_sd_configs" in body
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_vllm_statistics_keep_vllms_names():
    """The collector serves an engine snapshot (the plain-dict form `snapshot(llm)` returns) under
    vLLM's metric names, one series per engine worker; the real engine's snapshot is served in
    test_label_vllm.py."""
    from prometheus_client import CollectorRegistry, generate_latest

    from ctvlp_dist.observe.vllm_stats import VLLMCollector

    c = VLLMCollector()
    reg = CollectorRegistry()
    reg.register(c)
    snap = [{"name": "vllm:num_requests_running", "labels": {"model_name": "m", "engine": "0"}, "kind": "gauge", "value": 2},
            {"name": "vllm:prompt_tokens", "labels": {"model_name": "m", "engine": "0"}, "kind": "counter", "value": 40},
            {"name": "vllm:e2e_request_latency_seconds", "labels": {"model_name": "m", "engine": "0"}, "kind": "histogram",
             "buckets": {"1.0": 1, "+Inf": 3}, "count": 3, "sum": 4.5}]
    threads = [threading.Thread(target=c.update, args=(w, snap)) for w in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    text = generate_latest(reg).decode()
    assert 'vllm:num_requests_running{engine="0",model_name="m",worker="1"} 2.0' in text
    assert 'vllm:prompt_tokens_total{engine="0",model_name="m",worker="0"} 40.0' in text
    assert 'vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="m",worker="0"} 3.0' in text
    assert 'vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m",worker="0"} 4.5' in text
