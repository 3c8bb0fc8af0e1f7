"""Shared fixtures: small real shard datasets on disk, and the real data in ../shared/data."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Small grid for loader/shard tests: fast, yet every code path is the real one.
SMALL_SHAPE = (16, 40, 40)
SMALL_SPACING = (18.0, 9.0, 9.0)


def pytest_runtest_setup(item):
    """`make test` runs `--dist loadgroup`, and xdist marks grouped tests by appending `@group` to
    their node ids. A pytest that xdist cannot tag (9.2 with xdist 3.8) splits the Ray group
    silently, so two Ray clusters and vLLM engines would share the machine: fail those tests instead."""
    if getattr(item.config.option, "loadgroup", False) and item.get_closest_marker("xdist_group") \
            and "@" not in item.nodeid:
        pytest.fail("pytest-xdist did not keep this test in its xdist_group; install the pinned pytest: "
                    "pip install -c requirements/constraints.txt pytest", pytrace=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "example_ct.nii.gz").exists():
        pytest.skip(f"real test data not found at {SHARED_DATA} (CI and dev machines have ../shared/data)")
    return SHARED_DATA


def make_cfg(**sections):
    from ctvlp_dist.config import Config

    cfg = Config()
    for name, kw in sections.items():
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **kw))
    return cfg


def synth_dataset(out: Path, codec: str = "npy", patients: int = 12, scans: int = 1, seed: int = 0,
                  max_samples: int = 3, shape=SMALL_SHAPE, spacing=SMALL_SPACING) -> Path:
    from data_shards.synth.cohort import run_synth

    cfg = make_cfg(synth=dict(patients=patients, out=str(out), seed=seed, scans_per_patient=scans, shape=shape,
                              spacing=spacing, workers=1),
                   shard=dict(codec=codec, max_samples=max_samples))
    run_synth(cfg, progress=False)
    return out


@pytest.fixture(scope="session", params=["npy", "lz4"])
def cohort(request, tmp_path_factory) -> Path:
    """A 12-patient (14-scan) synthetic dataset in several shards per split, per codec."""
    return synth_dataset(tmp_path_factory.mktemp(f"cohort-{request.param}"), codec=request.param, scans=1)


@pytest.fixture(scope="session")
def cohort_npy(tmp_path_factory) -> Path:
    return synth_dataset(tmp_path_factory.mktemp("cohort-npy"), codec="npy", patients=13, scans=2)


TRAIN_SHAPE = (24, 48, 48)


@pytest.fixture(scope="session")
def train_cohort(tmp_path_factory) -> tuple[Path, Path]:
    """(shards, silver labels): 20 synthetic patients (16 in train) labelled by the rules labeller."""
    from ctvlp_dist.labels.runner import run_label

    root = tmp_path_factory.mktemp("train-cohort")
    data = synth_dataset(root / "data", patients=20, max_samples=4, shape=TRAIN_SHAPE, spacing=(12.0, 7.0, 7.0))
    labels = root / "labels.parquet"
    run_label(make_cfg(label=dict(reports=str(data), out=str(labels), backend="rules")), progress=False)
    return data, labels


def metric_rows(run: Path) -> list[dict]:
    """The per-step rows of a training run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def run_ctvlp(*args: str, timeout: float = 600, env: dict | None = None):
    """The real CLI in a fresh process (Ray, DeepSpeed and torch.distributed never touch pytest's)."""
    import subprocess
    import sys

    cmd = [str(Path(sys.executable).parent / "ctvlp"), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
