"""Labels file: one row per report, atomic, resumable; sources; scoring; prompts; metrics."""
import json
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_shards.label_sets import load_label_set
from ctvlp_dist.labels.prompt import json_schema, settings_hash, yesno_messages
from ctvlp_dist.labels.runner import run_label
from ctvlp_dist.labels.scoring import ParseError, json_probabilities, yesno_probability
from ctvlp_dist.labels.sources import read_reports
from ctvlp_dist.labels.store import LabelStore, read_labels

from .conftest import make_cfg

LS = load_label_set("ctrate18")


def _csv(path, rows, header=("AccessionNo", "report_text")):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _run(src, out, **kw):
    return run_label(make_cfg(label=dict(reports=str(src), out=str(out), **kw)), progress=False)


def test_sources_detect_both_real_formats(tmp_path, cohort_npy):
    a = _csv(tmp_path / "a.csv", [("k1", "Pleural effusion."), ("k2", "Normal.")])
    assert read_reports(a) == [("k1", "Pleural effusion."), ("k2", "Normal.")]
    b = _csv(tmp_path / "b.csv", [("v_1_a_1.nii.gz", "Nodule.", "Nodule in RUL.")],
             header=("VolumeName", "Findings_EN", "Impressions_EN"))
    assert read_reports(b) == [("v_1_a_1", "Findings: Nodule.\nImpression: Nodule in RUL.")]
    shard = read_reports(cohort_npy)
    m = json.loads((cohort_npy / "manifest.json").read_text())
    assert sorted(k for k, _ in shard) == sorted(k for s in m["shards"] for k in s["keys"])
    assert all(t.startswith("Findings:") for _, t in shard)
    with pytest.raises(ValueError, match="--text-column"):
        read_reports(_csv(tmp_path / "c.csv", [("k", "x")], header=("key", "body")))


def test_output_schema_and_failed_rows(tmp_path):
    src = _csv(tmp_path / "r.csv", [("k1", "Pleural effusion is present."), ("k2", ""), ("k3", "No nodule.")])
    s = _run(src, tmp_path / "o.parquet")
    assert (s["reports_in"], s["ok"], s["failed"]) == (3, 2, 1)
    rows, meta = read_labels(tmp_path / "o.parquet")
    assert [r["key"] for r in rows] == ["k1", "k2", "k3"]
    assert rows[1]["status"] == "failed: empty report" and rows[1]["Pleural effusion"] is None
    assert rows[0]["Pleural effusion"] == 1 and 0 <= rows[0]["Pleural effusion__prob"] <= 1
    assert rows[0]["backend"] == "rules" and len(rows[0]["settings_hash"]) == 16
    assert json.loads(rows[0]["raw_output"])[0][:2] == ["Pleural effusion", "positive"]
    assert meta["accounting"]["reports_in"] == 3
    cols = pq.read_schema(tmp_path / "o.parquet").names
    assert all(n in cols and f"{n}__prob" in cols for n in LS.names)


def test_rerun_resumes_and_relabels_failures(tmp_path):
    src = _csv(tmp_path / "r.csv", [("k1", "Pleural effusion."), ("k2", "")])
    out = tmp_path / "o.parquet"
    _run(src, out)
    _csv(src, [("k1", "Pleural effusion."), ("k2", "Emphysema."), ("k3", "Nodule.")])
    s = _run(src, out)
    assert s["skipped_already_labelled"] == 1 and s["ok"] == 2  # k1 reused; k2 (failed before) and k3 labelled
    rows, _ = read_labels(out)
    assert [(r["key"], r["status"]) for r in rows] == [("k1", "ok"), ("k2", "ok"), ("k3", "ok")]


def test_crash_leaves_parts_that_the_next_run_reuses(tmp_path):
    """Parts written before a crash count as done; the final file appears only at the end."""
    out = tmp_path / "o.parquet"
    h = settings_hash(LS, "rules", "rules", "rules")
    st = LabelStore(out, LS.names, h)
    row = {"key": "k1", "status": "ok", "backend": "rules", "model": "rules", "settings_hash": h, "tokens_in": 0,
           "tokens_out": 0, "attempts": 1, "raw_output": "[]", **{n: 0 for n in LS.names},
           **{f"{n}__prob": 0.1 for n in LS.names}}
    st.append([row])  # ... and then the process dies
    assert not out.exists() and (tmp_path / "o.parquet.parts" / "part-000000.parquet").exists()
    src = _csv(tmp_path / "r.csv", [("k1", "Pleural effusion."), ("k2", "Emphysema.")])
    s = _run(src, out)
    assert s["skipped_already_labelled"] == 1 and s["ok"] == 1
    assert not (tmp_path / "o.parquet.parts").exists() and not list(tmp_path.glob("*.partial"))


def test_damaged_label_part_is_logged_counted_and_relabelled(tmp_path, caplog):
    """A part damaged by a crash is not trusted: its reports are labelled again, and the run says
    which file it was, in the log and in its summary, rather than skipping it in silence."""
    import logging

    out = tmp_path / "o.parquet"
    parts = tmp_path / "o.parquet.parts"
    parts.mkdir()
    bad = parts / "part-000000.parquet"
    bad.write_bytes(b"PAR1 truncated by a crash")
    src = _csv(tmp_path / "r.csv", [("k1", "Pleural effusion."), ("k2", "Emphysema.")])
    with caplog.at_level(logging.WARNING, logger="ctvlp_dist.labels.store"):
        s = _run(src, out)
    assert s["damaged_label_parts"] == [str(bad)]
    assert s["ok"] == 2 and s["skipped_already_labelled"] == 0
    assert [r.getMessage() for r in caplog.records if str(bad) in r.getMessage()], caplog.records
    assert [r["key"] for r in read_labels(out)[0]] == ["k1", "k2"]


def test_changed_settings_relabel(tmp_path):
    src = _csv(tmp_path / "r.csv", [("k1", "Pleural effusion.")])
    out = tmp_path / "o.parquet"
    _run(src, out)
    assert _run(src, out, label_set="fvlm_anatomy")["skipped_already_labelled"] == 0
    assert settings_hash(LS, "vllm", "m", "yesno") != settings_hash(LS, "vllm", "m", "json")


def test_yesno_probability():
    assert yesno_probability({"Yes": np.log(0.3), "No": np.log(0.1)}) == pytest.approx(0.75)
    assert yesno_probability({"yes": -1.0, "Yes": -1.0, "no": np.log(2 * np.exp(-1.0))}) == pytest.approx(0.5)
    assert yesno_probability({}) is None and yesno_probability({"No": -3.0}) == 0.0


def test_json_probabilities_read_value_positions():
    names = ["A b", "C"]
    toks = [("{", {}), ('"', {}), ("A b", {}), ('":', {}), ("true", {"true": np.log(0.8), "false": np.log(0.2)}),
            (",", {}), ('"', {}), ("C", {}), ('":', {}), ("f", {"f": np.log(0.6), "t": np.log(0.3), "tr": np.log(0.1)}),
            ("alse", {}), ("}", {})]
    p = json_probabilities('{"A b":true,"C":false}', toks, names)
    assert p["A b"] == pytest.approx(0.8) and p["C"] == pytest.approx(0.4)
    with pytest.raises(ParseError, match="not JSON"):
        json_probabilities('{"A b":tr', toks[:5], names)
    with pytest.raises(ParseError, match="schema"):
        json_probabilities('{"A b":true}', toks[:6], names)


def test_prompt_and_schema_come_from_the_label_set():
    for name in ("ctrate18", "fvlm_anatomy"):
        ls = load_label_set(name)
        sch = json_schema(ls)
        assert list(sch["properties"]) == ls.names == sch["required"]
        for f in ls.findings:
            assert f.name in yesno_messages(ls, "R", f)[-1]["content"]


def test_prometheus_exporter_on_loopback(tmp_path):
    from ctvlp_dist.labels.accounting import Accounting

    from ctvlp_dist.config import MetricsConfig
    from ctvlp_dist.observe import Exporter

    acct = Accounting("rules", Exporter(MetricsConfig(), tmp_path, "label", "label"))
    try:
        acct.add([{"status": "ok", "tokens_in": 5, "tokens_out": 2, "engine_seconds": 0.3},
                  {"status": "failed: empty report"}, {"status": "failed: no JSON after 2 attempt(s)"}])
        acct.retry()
        acct.queue(3)
        assert acct.ex._server.server_address[0] == "127.0.0.1"
        body = urllib.request.urlopen(f"http://127.0.0.1:{acct.port}/metrics", timeout=10).read().decode()
        for line in ('ctvlp_label_reports_total{status="ok"} 1.0', 'ctvlp_label_reports_total{status="failed"} 2.0',
                     'ctvlp_label_tokens_total{kind="prompt"} 5.0', 'ctvlp_label_failures_total{reason="empty_report"} 1.0',
                     'ctvlp_label_failures_total{reason="unparsable"} 1.0', 'ctvlp_label_failures_total{reason="other"} 0.0',
                     "ctvlp_label_retries_total 1.0", "ctvlp_label_queue_depth 3.0"):
            assert line in body, line
        assert "ctvlp_label_seconds_per_report_bucket" in body
    finally:
        acct.close()


def test_loader_joins_silver_labels_by_key(tmp_path):
    from ctvlp_dist.data import LabelTable

    src = _csv(tmp_path / "r.csv", [("k1", "Pleural effusion is present."), ("k2", "")])
    _run(src, tmp_path / "o.parquet")
    t = LabelTable.from_file(tmp_path / "o.parquet", LS.names)
    v = t.lookup(["k2", "k1"])
    assert np.isnan(v[0]).all()  # failed row: no labels, not zeros
    assert v[1][LS.names.index("Pleural effusion")] == 1 and v[1][LS.names.index("Emphysema")] == 0


def test_ctrate18_maps_each_finding_to_fvlm_s_organ():
    """Per-anatomy evaluation scores a finding with its organ's embedding: fVLM's released CT-RATE
    mapping (issue 31's table), the two without an organ on the whole report's."""
    organs = {f.name: f.anatomy for f in load_label_set("ctrate18").findings}
    want = {"lung": {"Emphysema", "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela",
                     "Pleural effusion", "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation",
                     "Bronchiectasis", "Interlobular septal thickening"},
            "heart": {"Cardiomegaly", "Pericardial effusion", "Coronary artery wall calcification"},
            "aorta": {"Arterial wall calcification"}, "esophagus": {"Hiatal hernia"},
            "global": {"Medical material", "Lymphadenopathy"}}
    assert {o: {n for n, a in organs.items() if a == o} for o in set(organs.values())} == want
