"""The real thing, end to end: Ray Train (a local cluster) runs the DeepSpeed ZeRO-2 loop on 2
gloo workers over real shards, checkpoints through Ray's API, and a worker that dies mid-run is
restarted by FailureConfig and resumes from the last checkpoint. The resumed steps' losses equal
an uninterrupted run's bit for bit (fp32, deterministic), and so do the final weights."""
import json

import pytest
import torch
from safetensors.torch import load_file

from .conftest import ROOT, metric_rows, run_ctvlp
from .prom import Prometheus, dashboard_exprs

# Tests that start a local Ray cluster share one xdist worker, so no two clusters run at once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]
CONFIG = str(ROOT / "configs" / "train_tiny_cpu.yaml")


def test_ray_zero2_kill_and_exact_resume(train_cohort, tmp_path):
    data, labels = train_cohort
    common = [f"train.data={data}", f"loader.labels={labels}", "train.steps=4", "train.ckpt_every=2",
              "train.aux_weight=0.5", "train.zero_stage=2", "train.workers=2", "--quiet"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_ctvlp("train", "--config", CONFIG, f"train.out={a}", *common)
    prom = Prometheus([b], tmp_path / "prom")  # a real server scrapes run b every second, through its discovery files
    try:
        p = run_ctvlp("train", "--config", CONFIG, f"train.out={b}", "train.max_failures=1", "metrics.linger_s=6",
                      *common, env={"CTVLP_TEST_FAIL_AT_STEP": "4"})
        _scraped_as_documented(prom)
    finally:
        prom.close()
    ref = {r["step"]: r for r in metric_rows(a)}
    assert sorted(ref) == [1, 2, 3, 4]
    got = metric_rows(b)
    # attempt 1: steps 1, 2 (checkpoint), 3, then rank 1 dies; attempt 2 resumes at 2: steps 3, 4
    assert [r["step"] for r in got] == [1, 2, 3, 3, 4]
    for r in got:
        assert r["loss"] == ref[r["step"]]["loss"], (r["step"], r["loss"], ref[r["step"]]["loss"])  # bit for bit
        assert r["lr"] == ref[r["step"]]["lr"] and r["logit_scale"] == ref[r["step"]]["logit_scale"]
    summary = json.loads((b / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["workers"] == 2 and summary["global_batch"] == 8
    assert summary["resumed_from"] is not None and "checkpoint_" in summary["resumed_from"]
    assert "worker died" in p.stdout + p.stderr  # Ray saw the kill (the worker logs "fault injection")
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the run really learned something: weights moved from their seeded initialisation
    assert len({float(r["loss"]) for r in ref.values()}) == 4
    row = ref[4]
    for k in ("samples_per_s", "scans_per_s_per_worker", "data_s", "forward_s", "backward_s", "optimizer_s",
              "host_peak_rss", "lr", "logit_scale"):
        assert row[k] is not None
    assert row["step_s"] == pytest.approx(row["data_s"] + row["forward_s"] + row["backward_s"] + row["optimizer_s"])


def _scraped_as_documented(prom):
    """Every rank of both attempts was scraped with its target labels; samples/s was positive; the
    counters went on from the checkpoint (attempt 2 restored step 2's totals and ran steps 3 and 4:
    without the restore its rank 0 would end at 2 steps, below attempt 1's 3); Ray's node metrics
    came through the same discovery folder; each training, data and cluster expression of the
    dashboard returns series."""
    steps = prom.range("ctvlp_train_steps_total")
    assert {(s["metric"]["rank"], s["metric"]["stage"], s["metric"]["job"]) for s in steps} == {("0", "clip", "b"),
                                                                                               ("1", "clip", "b")}
    assert len({s["metric"]["instance"] for s in steps}) == 4  # 2 ranks x 2 attempts, each its own port
    assert max(prom.values("sum(rate(ctvlp_train_samples_total[10s]))")) > 0
    assert max(prom.values('max(ctvlp_train_steps_total{rank="0"})')) == 4
    assert max(prom.values('max(ctvlp_train_samples_total{rank="1"})')) == 16  # 4 steps x 4 scans on each rank
    assert prom.range('ray_node_cpu_utilization{stage="ray"}')
    for e in dashboard_exprs(("ctvlp_train_", "ctvlp_loader_", "ray_node_", "up{")):
        assert prom.range(e), f"no series: {e}"
