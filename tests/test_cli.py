"""The `ctvlp` command line: help for every command, friendly errors, demo and bench run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

CTVLP = str(Path(sys.executable).parent / "ctvlp")
COMMANDS = ["synth", "shard", "verify", "label", "bench", "demo", "config"]


def run(*args, timeout=300):
    return subprocess.run([CTVLP, *args], capture_output=True, text=True, timeout=timeout)


def test_top_level_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for c in COMMANDS:
        assert f"\n    {c} " in r.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_command_has_help(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "usage: ctvlp " + cmd in r.stdout


def test_errors_say_what_to_do(tmp_path):
    r = run("synth", "--out", str(tmp_path), "synth.patinets=3")
    assert r.returncode == 2 and "did you mean 'synth.patients'" in r.stderr
    r = run("shard", "--images", str(tmp_path))
    assert r.returncode == 2 and "needs --reports" in r.stderr
    r = run("verify", str(tmp_path))
    assert r.returncode == 1 and "manifest.json not found" in r.stdout


def test_config_show_and_keys():
    r = run("config", "show", "loader.batch_size=7")
    assert r.returncode == 0 and "batch_size: 7" in r.stdout
    r = run("config", "keys")
    assert "loader.batch_size" in r.stdout.split()


def test_demo_runs(tmp_path):
    r = run("demo", "--out", str(tmp_path / "demo"), "--quiet", "demo.patients=6", timeout=600)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert s["scans"] == 6 and s["train_samples_loaded"] >= 1
    assert "[2/4] verify: " in r.stdout and "OK" in r.stdout
    assert s["silver_labels_macro_auc"] > 0.8


def test_bench_loader_writes_result(tmp_path):
    r = run("bench", "loader", "--quiet", "bench.patients=3", "synth.shape=[16,40,40]", "synth.spacing=[18,9,9]",
            "loader.crop=[8,16,16]", "loader.num_workers=0", f"bench.results_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    (res,) = tmp_path.glob("loader-cpu-*.json")
    rec = json.loads(res.read_text())
    for k in ("device", "date", "torch", "command", "throughput", "compression_ratio_synthetic"):
        assert k in rec
    assert {row["dataset"] for row in rec["throughput"]} == {"npy", "lz4"}
    assert all(row["samples_per_s"] > 0 for row in rec["throughput"])
    assert rec["compression_ratio_synthetic"]["npy"] < 1.0 < rec["compression_ratio_synthetic"]["lz4"]
    assert "| dataset | pass |" in r.stdout
