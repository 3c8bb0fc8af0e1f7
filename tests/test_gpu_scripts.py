"""The one-call GPU scripts are spent only on a lent GPU, so their plumbing is checked here first:
`loss_gpu.py --dry` runs every phase on CPU (the Triton interpreter, fp32, tiny b, the first and
last config of each sweep list). The timings are meaningless; what must hold is that every step
runs, its records are written and the choices made from them are the fastest rows.
`conv_gpu.py --dry` collects the tests its pytest phases would run."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_loss_gpu_script_dry_run_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loss_gpu.py"), str(tmp_path),
                        "--phases", "pytest,pytest_new,sweep,bench,big,panel", "--dry"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SKIPPED" not in r.stdout and "TIMEOUT" not in r.stdout, r.stdout[-3000:]
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
    assert set(logs) == {"pytest_cuda.log", "pytest_cuda_variants.log", "sweep.log", "bench.log", "big.log",
                         "panel_256.log", "panel_512.log", "panel_bench.log", "panel_mixed.log"}
    for name, text in logs.items():
        assert "Traceback" not in text and "'error':" not in text, (name, text[-2000:])
    assert re.search(r"^\d+/\d+ tests collected", logs["pytest_cuda_variants.log"], re.M)  # CUDA tests: collected
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [c["pass"] for c in sweep["configs"]] == ["fwd", "fwd", "bwd", "bwd"]
    assert all("ms" in c for c in sweep["configs"]), sweep["configs"]
    fwd = min((c for c in sweep["configs"] if c["pass"] == "fwd"), key=lambda c: c["ms"])
    assert sweep["best"]["fwd"] == fwd["tiles"]
    plain = [c for c in sweep["configs"] if c["pass"] == "fwd" and len(c["tiles"].split(",")) == 6]
    assert sweep["best_plain"]["fwd"] == min(plain, key=lambda c: c["ms"])["tiles"]  # what production can run
    panel = json.loads((tmp_path / "panel.json").read_text())["runs"]
    assert set(panel) == {"256", "512"}
    rows = [x for runs in panel.values() for x in runs if x["variant"] == "panel"]
    assert rows and all(x["max_rel_diff_vs_two_pass"] < 1e-5 for x in rows), rows
    assert any(x["tiles"].split(";")[0].endswith(",1") for x in rows), rows  # a TMA G tile ran
    assert len(list(tmp_path.glob("loss-cpu-*.json"))) == 2  # bench, big
    compares = [json.loads(p.read_text()) for p in tmp_path.glob("loss-variants-*.json")]
    assert sorted(c["inputs"] for c in compares) == ["mixed", "random"]
    for c in compares:
        variant = [x for x in c["rows"] if x["method"] == "variant"]
        assert variant and all(x["max_rel_diff_vs_triton"] < 1e-4 for x in variant), c["rows"]


def test_conv_gpu_script_selects_the_candidate_default_tests(tmp_path):
    """`conv_gpu.py --phases pytest_new` (beside the tower in one device call) must select the
    CUDA tests of what would become the defaults, and only those: collected here, not run."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "conv_gpu.py"), str(tmp_path),
                        "--phases", "pytest_new,pytest", "--dry"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    new = (tmp_path / "pytest_new.log").read_text()
    ids = [x for x in new.splitlines() if "::" in x]
    assert all(x.startswith("kernels/tuning/test_conv3d_variants.py::") for x in ids), ids
    assert sum("test_cuda_bf16_variants[" in x for x in ids) == 12
    assert sum("under_a_variant" in x for x in ids) == 6 and sum("through_l1" in x for x in ids) == 2
    assert sum("swapped_operands" in x for x in ids) == 8
    for log in ("pytest_conv.log", "pytest_block.log"):  # the full phase: every test, no collection error
        tail = (tmp_path / log).read_text().strip().splitlines()[-1]
        assert re.fullmatch(r"\d+ tests collected in [\d.]+s", tail), (log, tail)


def test_preflight_names_every_planned_launch_and_compiles_them(tmp_path):
    """benchmarks/preflight.py (`make preflight`) compiles for sm_90a what the GPU calls will
    launch: every sweep tile and panel configuration of loss_configs.py, production's loss
    launches, and the tower under production's kernels and each variant, inference and training. Listed here in full, and the first launch of
    each group compiled (the venv's Triton; `make preflight` runs the GPU image's)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from loss_configs import BWD, FWD, PANEL

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = [sys.executable, str(ROOT / "benchmarks" / "preflight.py")]
    r = subprocess.run(run + ["--list"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    names = r.stdout.splitlines()
    for t in FWD:
        assert f"loss forward {t}" in names
    assert sum(n.startswith("loss backward") for n in names) == 2 * (len(BWD) + 1)
    assert sum(n.startswith("loss panel") for n in names) == 3 * len(PANEL)
    assert sum(n.startswith("loss production") for n in names) == 4  # forward, finalize, the two backward passes
    tower = [re.fullmatch(r"tower \[(\w+), (\w+) stem\] (.+) (inference|train) (\w+)", n) for n in names
             if n.startswith("tower")]
    assert tower and all(tower), names
    from kernels.tuning.bench_conv import TOWER_VARIANTS

    assert {m[3] for m in tower} == {"production", *TOWER_VARIANTS}, tower
    assert {(m[1], m[2]) for m in tower} == {("bfloat16", "k2s2"), ("bfloat16", "standard"), ("float16", "k2s2"),
                                             ("float32", "k2s2")}
    assert {"conv_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel", "conv_fwd_variant", "conv_dgrad_variant", "conv_wgrad_variant"} <= {m[5] for m in tower}
    r = subprocess.run(run + ["--limit", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "2 launches, 0 failed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_loader_gpu_script_dry_run_on_cpu(tmp_path):
    """`loader_gpu.py --dry`: the agreement check (CPU-only DALI against the torch loader, bit for
    bit, both codecs, centre and augmented crops) and `bench loader` with every row the GPU run
    will have, on tiny volumes."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loader_gpu.py"), str(tmp_path), "--dry"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SKIPPED" not in r.stdout and "TIMEOUT" not in r.stdout, r.stdout[-3000:]
    check = json.loads((tmp_path / "check.json").read_text())
    assert len(check) == 4 and all(c["bit_identical"] and c["device"] == "cpu" for c in check), check
    (rec,) = [json.loads(p.read_text()) for p in tmp_path.glob("loader-cpu-*.json")]
    backends = {(row["dataset"], row["backend"]) for row in rec["throughput"]}
    assert {b for _, b in backends} >= {"torch (threads)", "torch (processes)", "dali", "torch DataLoader (baseline)"}
    assert rec["training_step"] is None and set(rec["goals"]) == {"x_vs_per_file_npz", "x_vs_per_file_npy"}
