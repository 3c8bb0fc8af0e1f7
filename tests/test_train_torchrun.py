"""The same loop under plain torchrun (2 gloo processes), supervised stage at ZeRO-3: a
checkpoint written with partitioned parameters and optimizer states loads into a new run, which
continues bit for bit (its step 3 equals the uninterrupted run's step 3, and so do the final
weights). Checkpoints live in out/checkpoints/step_N, and are marked COMPLETE."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def _torchrun(*overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "ctvlp_dist.train.worker", "--config", str(ROOT / "configs" / "train_tiny_cpu.yaml"), *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-5000:]
    return p


def test_zero3_checkpoint_resumes_exactly_under_torchrun(train_cohort, tmp_path):
    data, labels = train_cohort
    common = [f"train.data={data}", f"loader.labels={labels}", "train.stage=supervised", "train.text_bce=true",
              "train.zero_stage=3", "train.steps=3", "train.progress=false"]
    a, b = tmp_path / "a", tmp_path / "b"
    _torchrun(*common, f"train.out={a}", "train.ckpt_every=2")
    done = sorted(p.name for p in (a / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert done == ["step_00000002", "step_00000003"]
    ck = a / "checkpoints" / "step_00000002"
    assert {"rank0.json", "rank1.json", "rank0.rng.safetensors", "config.json"} <= {p.name for p in ck.iterdir()}
    assert len(list((ck / "ds").glob("zero_pp_rank_*_optim_states.pt"))) == 2  # ZeRO-3 partitions, one per rank
    _torchrun(*common, f"train.out={b}", f"train.resume={ck}")
    ra = {r["step"]: r for r in map(json.loads, (a / "metrics.jsonl").read_text().splitlines())}
    rb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rb] == [3]
    assert rb[0]["loss"] == ra[3]["loss"] and rb[0]["lr"] == ra[3]["lr"]
    assert json.loads((b / "summary.json").read_text())["resumed_from"] == str(ck)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the ZeRO-3 export holds whole tensors, not partitions
    assert wa["image.stem.0.weight"].shape == (64, 1, 4, 4, 4)
