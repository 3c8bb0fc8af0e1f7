"""The `ctvlp` command line: help for every command, friendly errors, demo and bench run."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ctvlp_dist.config import load_config

CTVLP = str(Path(sys.executable).parent / "ctvlp")
COMMANDS = ["synth", "shard", "verify", "label", "bench", "demo", "config", "train", "eval"]
ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=300):
    return subprocess.run([CTVLP, *args], capture_output=True, text=True, timeout=timeout)


def test_top_level_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for c in COMMANDS:
        assert f"\n    {c} " in r.stdout


def test_version_is_the_package_version():
    from ctvlp_dist import __version__
    from importlib.metadata import version
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ctvlp {__version__}"
    assert version("ctvlp_dist") == __version__  # setup.py reads the same string


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_command_has_help(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "usage: ctvlp " + cmd in r.stdout


@pytest.mark.parametrize("cmd,sections", [("synth", ["synth"]), ("shard", ["ingest", "shard", "preprocess"]),
                                          ("bench", ["bench"]), ("label", ["label"]), ("train", ["train", "optim"]),
                                          ("eval", ["eval"]), ("demo", ["demo"])])
def test_help_lists_its_keys_as_valid_overrides(cmd, sections):
    """Each `section.key=value` a command's help shows, passed back as an override, loads as the default."""
    text = " ".join(run(cmd, "--help").stdout.split())
    text = text[text.index("Keys, with their defaults: "):]
    alt = "|".join(sections)
    listed = re.findall(rf"((?:{alt})\.\w+)=(.+?)(?=, (?:{alt})\.|\. Every command)", text)
    defaults = load_config(None, [])
    assert {k for k, _ in listed} == {f"{s}.{f}" for s in sections for f in vars(getattr(defaults, s))}
    for key, value in listed:
        section, name = key.split(".")
        loaded = load_config(None, [f"{key}={value}"])
        assert getattr(getattr(loaded, section), name) == getattr(getattr(defaults, section), name), key


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


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # the demo labels through Ray actors
def test_demo_runs(tmp_path):
    """A smaller version of the demo's whole path: every stage runs for real (vLLM on 2 reports,
    both training stages on 2 Ray workers for 2 steps each); the AUC bar is the full demo's."""
    r = run("demo", "--config", str(ROOT / "configs" / "demo.yaml"), "--out", str(tmp_path / "demo"), "--quiet", "demo.patients=16",
            "demo.vllm_reports=2", "demo.supervised_steps=2", "demo.clip_steps=2", "eval.bootstrap=20",
            "loader.batch_size=2", "train.global_batch=4", timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    lr = {s: [json.loads(x)["lr"] for x in (tmp_path / "demo" / s / "metrics.jsonl").read_text().splitlines()]
          for s in ("supervised", "clip")}
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert lr["clip"][0] / lr["supervised"][0] == pytest.approx(cfg.demo.clip_lr / cfg.optim.lr)  # each stage its lr
    assert set(m["demo"]["label_quality"]) == {"rules", "vllm"}
    assert m["demo"]["label_quality"]["rules"]["macro_auc"] > 0.8
    assert m["demo"]["training"]["supervised"]["steps"] == 2 and m["demo"]["training"]["clip"]["steps"] == 2
    assert m["samples"] >= 1 and "macro_auc" in m["zero_shot"]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert report.startswith("# Evaluation")
    env = m["demo"]["environment"]
    assert f"with {' '.join(env['cpu_simd']) or 'no listed SIMD'}, torch {env['torch']}." in report
    assert "[2/6] verify: " in r.stdout and "report:" in r.stdout


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


@pytest.mark.slow
def test_bench_loss_ptx_records_what_tma_loads_change(tmp_path):
    """`bench loss` with no sizes and loss_ptx: the loss kernels compiled for sm_90a here (no GPU),
    each tile with and without TMA loads side by side; in the interpreter it says what to do."""
    from ctvlp_dist.bench.loss import PTX_BWD, PTX_FWD, PTX_GRAD

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([CTVLP, "bench", "loss", "bench.loss_sizes=[]", "bench.loss_ptx=true",
                        f"bench.results_dir={tmp_path}"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    (res,) = tmp_path.glob("loss-cpu-*.json")
    rec = json.loads(res.read_text())
    assert rec["rows"] == [] and len(rec["ptx"]) == len(PTX_FWD) + 2 * len(PTX_BWD) + len(PTX_GRAD)
    roles = {}
    for x in rec["ptx"]:
        roles.setdefault(x["kernel_role"], []).append(x)
    assert [x["tiles"] for x in roles["forward"]] == PTX_FWD and [x["tiles"] for x in roles["panel G tile"]] == PTX_GRAD
    assert [x["tiles"] for x in roles["backward cols (dT)"]] == PTX_BWD
    for rows in roles.values():
        for plain, tma in zip(rows[::2], rows[1::2]):  # each pair differs only in the TMA bit
            assert plain["loop_async_loads"] > tma["loop_async_loads"] and plain["loop_tma_loads"] == 0, plain
            assert tma["loop_tma_loads"] > 0 and tma["spill_store_bytes"] == 0, tma
            assert tma["registers"] <= plain["registers"], (plain, tma)
    assert "| kernel_role | tiles | registers |" in r.stdout
    bad = subprocess.run([CTVLP, "bench", "loss", "bench.loss_sizes=[]", "bench.loss_ptx=true"],
                         capture_output=True, text=True, timeout=300, env={**env, "TRITON_INTERPRET": "1"})
    assert bad.returncode != 0 and "run it without TRITON_INTERPRET=1" in bad.stderr


def _bench_conv_cpu(tmp_path, parts: str):
    """`ctvlp bench conv` with these parts in the Triton interpreter: (the process, its record)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([CTVLP, "bench", "conv", "--quiet", f"bench.conv_parts=[{parts}]",
                        f"bench.results_dir={tmp_path}"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    (res,) = tmp_path.glob("conv-cpu-*.json")
    return r, json.loads(res.read_text())


@pytest.mark.slow
def test_bench_conv_tower_and_tiles_on_cpu_check_agreement(tmp_path):
    """On CPU, `bench conv` runs the Triton kernels in the interpreter and records only whether
    they agree with torch (the GPU path times them; it needs a lent GPU): the tower, and each
    kernel of layer1 under every tile of the sweep."""
    from kernels.conv3d import SWAP_TILES, TILE_GRID

    r, rec = _bench_conv_cpu(tmp_path, "tower,tiles")
    assert len(rec["tiles"]) == 3 * len(TILE_GRID) + 2 * len(SWAP_TILES)
    assert sum(t["tile"].endswith(" swap") for t in rec["tiles"] if t["kernel"] != "wgrad") == 2 * len(SWAP_TILES)
    assert all(t["rel_err_vs_cudnn"] < 1e-5 for t in rec["tiles"]), rec["tiles"]
    # inference first (its goal is the open one), then training; each Triton row checks itself
    # against the torch tower under its own K loop and tiles, and counts what its launches ran
    rows = {(row["tower"], row["impl"]): row for row in rec["tower"]}
    assert [m for m, _ in rows] == ["inference"] * 6 + ["train fwd+bwd"] * 5  # the L1 row: inference alone
    assert not any("error" in row for row in rows.values()), rec["tower"]
    for (mode, impl), row in rows.items():
        assert 0 < row["saved_MB_triton"] < 0.9 * row["saved_MB_torch"]  # the fused blocks keep fewer activations
        if impl == "cudnn eager":
            assert "conv_launches" not in row and "rel_err_y" not in row
            continue
        errs = [row["rel_err_inference"]] if mode == "inference" else [row["rel_err_y"], row["rel_err_dx"]]
        assert all(0 <= e < 1e-4 for e in errs), row
        assert row["conv_launches"] == (20 if mode == "inference" else 60), row  # 20 convolutions; 3 GEMMs each to train
        assert (row["tap_launches"] > 0) == ("tap K loop" in impl), row
        assert row["l1_launches"] == (row["tap_launches"] if "through L1" in impl else 0), row  # tap forwards only
        # width 8: every convolution has at most 64 output channels, so all but the wgrads swap
        assert row["swapped_launches"] == (row["conv_launches"] * 2 // 3 if mode != "inference" else 20) * (
            "swapped" in impl), row
    assert "| tower | impl |" in r.stdout
    bad = run("bench", "conv", "bench.conv_parts=[towr]")
    assert bad.returncode != 0 and "choose from layers, blocks, tower, tiles, launches" in bad.stderr


@pytest.mark.slow
def test_bench_conv_launches_lists_the_block_step_kernel_by_kernel(tmp_path):
    """`bench conv` part launches on CPU (interpreter; timings meaningless): one fused identity
    block's training step as its kernel launches, in order. With the BatchNorm maps applied by
    passes (the default), the GEMMs carry only epilogues: statistics, the ReLU/BN reductions,
    the residual. Each GEMM is replayed with its fusion flags off too, and swept over a tile."""
    r, rec = _bench_conv_cpu(tmp_path, "launches")
    got = [(row["kernel"], row.get("fused")) for row in rec["launches"]]
    assert got == [("_conv_fwd", "STATS_ON"), ("_bn_act_fwd", "RELU"),  # conv1, BN1 + ReLU (transient)
                   ("_conv_fwd", "STATS_ON"), ("_bn_act_fwd", "HAS_RES+RELU"),  # conv2, BN2 + x + ReLU
                   ("_bn_act_bwd", "-"), ("_bn_act_fwd", "HAS_RES+RES_BN"),  # ReLU backward, dY2 = BN2 backward
                   ("_bn_act_fwd", "RELU"), ("_conv_wgrad", "-"), ("_conv_dgrad", "RELU_BN"),  # BN1 + ReLU again
                   ("_bn_act_fwd", "HAS_RES+RES_BN"), ("_conv_wgrad", "-"), ("_conv_dgrad", "HAS_RES"),
                   ("(whole step)", None)]
    assert all(row["plain_ms"] > 0 for row in rec["launches"] if row["kernel"].startswith("_conv"))
    assert {row["layer"] for row in rec["launch_tiles"]} == {f"layer1.0 #{i}" for i in (0, 2, 7, 8, 10, 11)}
    assert "| block | i | kernel |" in r.stdout


def test_records_written_in_one_second_are_all_kept(tmp_path):
    """Records are named by the second; a second record in the same second (a GPU script's quick
    steps) gets a suffix rather than overwriting the first."""
    from ctvlp_dist.bench.record import write_result

    paths = [write_result(tmp_path, "loss", {"i": i}, argv=["x"]) for i in range(3)]
    assert len(set(paths)) == 3 and sorted(json.loads(p.read_text())["i"] for p in paths) == [0, 1, 2]


def test_records_name_the_cpu_simd_and_isa_caps(tmp_path):
    """fp32 CPU training is bit-reproducible only on the same vector extensions (the demo's 0.785
    vs 0.795, benchmarks/README.md), so a record lists the CPU's and any variable that caps them."""
    from ctvlp_dist.bench.record import _cpu

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 "
                   "avx512fx\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 amx_tile\n")
    assert _cpu(x86) == ("AMD EPYC 9R14", ["avx2", "fma", "avx512f", "avx512_bf16"])  # the first block's flags
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd sve sve2 bf16\n")
    assert _cpu(arm)[1] == ["asimd", "sve", "sve2"]
    assert _cpu(tmp_path / "absent")[1] == []

    code = ("import sys; from ctvlp_dist.bench.record import write_result; "
            "print(write_result(sys.argv[1], 'loss', {}, argv=['x']))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rec = json.loads(Path(r.stdout.strip()).read_text())
    assert rec["cpu_capability"] == "DEFAULT"  # ATen's dispatch level, as lowered
    assert rec["env"]["ATEN_CPU_CAPABILITY"] == "default" and rec["env"]["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"


def test_best_tiles_picks_the_fastest_and_its_gain_over_the_default():
    from ctvlp_dist.bench.conv import _tile_name, best_tiles
    from kernels.conv3d import TILE_GRID

    d, a, b = (_tile_name(t) for t in TILE_GRID[:3])
    rows = [{"layer": "L", "kernel": "fwd", "tile": d, "ms": 4.0, "tflops": 1.0, "speedup_vs_cudnn": 0.2, "default": True},
            {"layer": "L", "kernel": "fwd", "tile": a, "ms": 1.0, "tflops": 4.0, "speedup_vs_cudnn": 0.8},
            {"layer": "L", "kernel": "fwd", "tile": b, "error": "OutOfResources"},
            {"layer": "L", "kernel": "wgrad", "tile": d, "skipped": "budget", "default": True},
            {"layer": "L", "kernel": "wgrad", "tile": b, "ms": 2.0, "tflops": 2.0, "speedup_vs_cudnn": 0.5}]
    fwd, wgrad = best_tiles(rows)
    assert (fwd["best_tile"], fwd["ms"], fwd["gain_vs_default"]) == (a, 1.0, 4.0)
    assert wgrad["best_tile"] == b and "gain_vs_default" not in wgrad  # the default was never timed


def test_bench_loss_on_cpu_records_methods_and_inputs(tmp_path):
    """`ctvlp bench loss` on CPU: the torch methods (Triton methods need a GPU and are skipped),
    on the "mixed" inputs, whose pairs' cosines spread over [0, 0.9] at scale 100."""
    from ctvlp_dist.bench.loss import _inputs

    r = run("bench", "loss", "--quiet", "bench.loss_sizes=[300]", "bench.loss_methods=[dense,chunked,triton-panel]",
            "bench.loss_inputs=mixed", f"bench.results_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    (res,) = tmp_path.glob("loss-cpu-*.json")
    rec = json.loads(res.read_text())
    assert rec["inputs"] == "mixed" and [row["method"] for row in rec["rows"]] == ["dense", "chunked"]
    assert all(row["status"] == "ok" and row["ms"] > 0 for row in rec["rows"])
    import torch

    I, T, s = _inputs(2000, 64, torch.float32, "cpu", kind="mixed")
    cos = (I * T).sum(1)
    assert float(s) == 100.0 and 0 <= float(cos.min()) < 0.05 and 0.85 < float(cos.max()) <= 0.9 + 1e-6
    with pytest.raises(ValueError, match="random or mixed"):
        _inputs(4, 4, torch.float32, "cpu", kind="trained")


def test_forward_l2_bytes_count_each_tiles_re_reads():
    """The L2 traffic of layer1's forward (8 x 48 x 96^2 voxels, 64 -> 64 channels, 3^3), hand-counted:
    activation once per tap and per channel tile (M x 1,728 x 2 B), weight once per voxel tile,
    output once. A 512-voxel tile reads the weight a quarter as often as a 128-voxel one."""
    import torch

    from ctvlp_dist.bench.conv import fwd_l2_bytes
    from kernels.compile_report import capture
    from kernels.conv3d import conv3d_forward, tile_override

    x = torch.empty(8, 64, 48, 96, 96, dtype=torch.bfloat16, device="meta").contiguous(
        memory_format=torch.channels_last_3d)
    w = torch.empty(64, 64, 3, 3, 3, dtype=torch.bfloat16, device="meta")
    M, act, out = 8 * 48 * 96 * 96, 8 * 48 * 96 * 96 * 1728 * 2, 8 * 48 * 96 * 96 * 64 * 2
    # the 256 x 128 tile's second half of channel columns is masked at 64 channels: it loads nothing
    for tile, m_tiles in (((128, 64, 64, 4, 3), 27_648), ((512, 64, 32, 8, 3, "swap"), 6_912),
                          ((256, 128, 64, 8, 3, "swap"), 13_824)):
        assert M // tile[0] == m_tiles
        with tile_override(tile, "fwd"):
            launch = capture(conv3d_forward, x, w, None, 1, 1)[0]
            with_res = capture(conv3d_forward, x, w, None, 1, 1, residual=x)[0]
        assert fwd_l2_bytes(*launch) == act + m_tiles * 1728 * 64 * 2 + out
        assert fwd_l2_bytes(*with_res) == fwd_l2_bytes(*launch) + out  # the residual is read once
    assert act + 27_648 * 1728 * 64 * 2 + out == 18_798_870_528  # 18.8 GB: 41x the 0.45 GB activation
