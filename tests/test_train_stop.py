"""Stopping a run on a signal (SLURM's early USR1 before a time limit or preemption, or scancel's
TERM): the run stops at a step boundary with a checkpoint, exits with a code of its own, and the
same command resumes there; the whole run's losses equal an uninterrupted run's bit for bit.
One local process here (the Ray driver's relay to its workers is exercised by the SLURM tests)."""
import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from .conftest import ROOT, metric_rows, run_ctvlp

CONFIG = str(ROOT / "configs" / "train_tiny_cpu.yaml")


def test_usr1_stops_at_a_step_with_a_checkpoint_and_the_run_resumes_exactly(train_cohort, tmp_path):
    from ctvlp_dist.train.stop import EXIT_REQUEUE

    data, labels = train_cohort
    common = [f"train.data={data}", f"loader.labels={labels}", "train.steps=4", "train.launcher=local",
              "train.zero_stage=0", "--quiet"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_ctvlp("train", "--config", CONFIG, f"train.out={ref}", *common)
    p = subprocess.Popen([sys.executable, "-m", "ctvlp_dist", "train", "--config", CONFIG, f"train.out={run}", *common],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    log = run / "metrics.jsonl"
    while time.time() < deadline and p.poll() is None and not (log.exists() and log.read_text().strip()):
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)  # after the first step was logged
    out, err = p.communicate(timeout=600)
    assert p.returncode == EXIT_REQUEUE, (p.returncode, err[-3000:])
    assert "stopped on request (requeue)" in out and "run the same command again" in out
    first = json.loads((run / "summary.json").read_text())
    assert first["stopped"] == "requeue" and 1 <= first["steps"] < 4 and first["export"] is None
    assert (run / "checkpoints" / f"step_{first['steps']:08d}" / "COMPLETE").exists()
    run_ctvlp("train", "--config", CONFIG, f"train.out={run}", *common)  # the requeued job
    final = json.loads((run / "summary.json").read_text())
    assert final["steps"] == 4 and final["stopped"] is None and final["resumed_from"].endswith(f"step_{first['steps']:08d}")
    want = {r["step"]: r["loss"] for r in metric_rows(ref)}
    got = metric_rows(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]  # each step once: the stop fell on a step boundary
    assert all(r["loss"] == want[r["step"]] for r in got), (got, want)  # bit for bit
    wa, wb = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_term_asks_for_a_stop_without_requeue(tmp_path):
    """scancel's SIGTERM: the handler only records the request (the step loop acts on it), with
    the cancel code, and a second signal does not change the first reason."""
    code = ("import os, signal\nfrom ctvlp_dist.train.stop import EXIT_CODES, StopRequest\n"
            "r = StopRequest().install()\nos.kill(os.getpid(), signal.SIGTERM)\nos.kill(os.getpid(), signal.SIGUSR1)\n"
            "print(r.reason, EXIT_CODES[r.reason])")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["cancelled", "76"]
