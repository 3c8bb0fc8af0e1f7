"""The tuning benchmarks (bench_conv.py, bench_loss.py) on CPU: the interpreter checks that every
variant, tile and launch they would time on a GPU agrees with torch, and that the records say
which variant each row ran; the loss's compile reports need a compiler (opt-in marker)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench(module: str, tmp_path, *args, interpret=True, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-m", module, str(tmp_path), *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    (res,) = tmp_path.glob("*.json")
    return r, json.loads(res.read_text())


@pytest.mark.slow
def test_bench_conv_tower_and_tiles_on_cpu_check_agreement(tmp_path):
    """The tower under each variant, and each kernel of layer1 under every tile of the sweep:
    inference first (its goal is the open one), then training; each row checks itself against
    the torch tower and counts what its launches ran."""
    from kernels.tuning.conv3d_variants import SWAP_TILES, TILE_GRID

    r, rec = _bench("kernels.tuning.bench_conv", tmp_path, "--parts", "tower,tiles")
    assert len(rec["tiles"]) == 3 * len(TILE_GRID) + 2 * len(SWAP_TILES)
    assert sum(t["tile"].endswith(" swap") for t in rec["tiles"] if t["kernel"] != "wgrad") == 2 * len(SWAP_TILES)
    assert all(t["rel_err_vs_cudnn"] < 1e-5 for t in rec["tiles"]), rec["tiles"]
    rows = {(row["tower"], row["impl"]): row for row in rec["tower"]}
    assert [m for m, _ in rows] == ["inference"] * 6 + ["train fwd+bwd"] * 5  # the L1 row: inference alone
    assert not any("error" in row for row in rows.values()), rec["tower"]
    for (mode, impl), row in rows.items():
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


@pytest.mark.slow
def test_bench_conv_launches_lists_the_block_step_kernel_by_kernel(tmp_path):
    """One fused identity block's training step as its kernel launches, in order: the BatchNorm
    maps are elementwise passes and the GEMMs carry only epilogues (statistics, the ReLU/BN
    reductions, the residual). Each GEMM is replayed with its fusion flags off too, and the step
    is swept over a tile."""
    r, rec = _bench("kernels.tuning.bench_conv", tmp_path, "--parts", "launches")
    got = [(row["kernel"], row.get("fused")) for row in rec["launches"]]
    assert got == [("conv_fwd_kernel", "STATS_ON"), ("bn_act_fwd_kernel", "RELU"),  # conv1, BN1 + ReLU (transient)
                   ("conv_fwd_kernel", "STATS_ON"), ("bn_act_fwd_kernel", "HAS_RES+RELU"),  # conv2, BN2 + x + ReLU
                   ("bn_act_bwd_kernel", "-"), ("bn_act_fwd_kernel", "HAS_RES+RES_BN"),  # ReLU backward, dY2 = BN2 backward
                   ("bn_act_fwd_kernel", "RELU"), ("conv_wgrad_kernel", "-"), ("conv_dgrad_kernel", "RELU_BN"),  # BN1 + ReLU again
                   ("bn_act_fwd_kernel", "HAS_RES+RES_BN"), ("conv_wgrad_kernel", "-"), ("conv_dgrad_kernel", "HAS_RES"),
                   ("(whole step)", None)]
    assert all(row["plain_ms"] > 0 for row in rec["launches"] if row["kernel"].startswith("conv_"))
    assert {row["layer"] for row in rec["launch_tiles"]} == {f"layer1.0 #{i}" for i in (0, 2, 7, 8, 10, 11)}
    assert "| block | i | kernel |" in r.stdout


def test_bench_conv_refuses_unknown_parts_and_ptx_in_the_interpreter(tmp_path):
    from kernels.tuning.bench_conv import main

    with pytest.raises(SystemExit):
        main([str(tmp_path), "--parts", "towr"])
    if os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(SystemExit):
            main([str(tmp_path), "--parts", "ptx"])


def test_best_tiles_picks_the_fastest_and_its_gain_over_the_default():
    from kernels.tuning.bench_conv import best_tiles
    from kernels.tuning.conv3d_variants import TILE_GRID, tile_name

    d, a, b = (tile_name(t) for t in TILE_GRID[:3])
    rows = [{"layer": "L", "kernel": "fwd", "tile": d, "ms": 4.0, "tflops": 1.0, "speedup_vs_cudnn": 0.2, "default": True},
            {"layer": "L", "kernel": "fwd", "tile": a, "ms": 1.0, "tflops": 4.0, "speedup_vs_cudnn": 0.8},
            {"layer": "L", "kernel": "fwd", "tile": b, "error": "OutOfResources"},
            {"layer": "L", "kernel": "wgrad", "tile": d, "skipped": "budget", "default": True},
            {"layer": "L", "kernel": "wgrad", "tile": b, "ms": 2.0, "tflops": 2.0, "speedup_vs_cudnn": 0.5}]
    fwd, wgrad = best_tiles(rows)
    assert (fwd["best_tile"], fwd["ms"], fwd["gain_vs_default"]) == (a, 1.0, 4.0)
    assert wgrad["best_tile"] == b and "gain_vs_default" not in wgrad  # the default was never timed


def _tiles_walked(M, K, Cout, BM, BN, res: bool, e: int = 2) -> int:
    """The bytes a forward's tiles load, counted by walking its grid: each (voxel tile, channel
    tile) program loads its BM x K activation rows (rows past M masked) and the K x BN weight
    columns that exist (channels past Cout masked), and the output (and residual) pass once."""
    total = 0
    for m0 in range(0, M, BM):
        rows = min(BM, M - m0)
        for n0 in range(0, Cout, BN):
            total += rows * K + K * min(BN, Cout - n0)
    return (total + M * Cout * (1 + res)) * e


def test_forward_l2_bytes_count_each_tiles_re_reads():
    """fwd_l2_bytes' closed form against a walk over the tiles, at a size small enough to walk
    (2 x 6 x 10 x 10 voxels, 64 -> 64 channels, 3^3), for the default-shaped tile, a 512-voxel
    swapped one and a channel tile wider than the channels (half its columns masked)."""
    from kernels.conv3d import conv3d_forward
    from kernels.tuning.bench_conv import fwd_l2_bytes
    from kernels.tuning.compile_report import capture
    from kernels.tuning.conv3d_variants import ConvVariant

    x = torch.empty(2, 64, 6, 10, 10, dtype=torch.bfloat16, device="meta").contiguous(
        memory_format=torch.channels_last_3d)
    w = torch.empty(64, 64, 3, 3, 3, dtype=torch.bfloat16, device="meta")
    M, K = 2 * 6 * 10 * 10, 27 * 64
    for tile in ((128, 64, 64, 4, 3), (512, 64, 32, 8, 3, "swap"), (256, 128, 64, 8, 3, "swap")):
        v = ConvVariant(tiles={"fwd": tile})
        with v.active():
            launch = capture(conv3d_forward, x, w, None, 1, 1, tiles=v.rule)[0]
            with_res = capture(conv3d_forward, x, w, None, 1, 1, residual=x, tiles=v.rule)[0]
        assert fwd_l2_bytes(*launch) == _tiles_walked(M, K, 64, tile[0], tile[1], False), tile
        assert fwd_l2_bytes(*with_res) == _tiles_walked(M, K, 64, tile[0], tile[1], True), tile


@pytest.mark.compiler
def test_bench_loss_ptx_records_what_tma_loads_change(tmp_path):
    """The loss kernels compiled for sm_90a here (no GPU), each tile with and without TMA loads
    side by side: TMA replaces the async copies and never needs more registers; the forward and G
    tiles spill nothing with it, and the two backward passes spill less in all."""
    from kernels.tuning.bench_loss import PTX_BWD, PTX_FWD, PTX_GRAD

    r, rec = _bench("kernels.tuning.bench_loss", tmp_path, interpret=False)
    assert len(rec["ptx"]) == len(PTX_FWD) + 2 * len(PTX_BWD) + len(PTX_GRAD)
    roles = {}
    for x in rec["ptx"]:
        roles.setdefault(x["kernel_role"], []).append(x)
    assert [x["tiles"] for x in roles["forward"]] == PTX_FWD and [x["tiles"] for x in roles["panel G tile"]] == PTX_GRAD
    assert [x["tiles"] for x in roles["backward cols (dT)"]] == PTX_BWD
    spills = {"plain": 0, "tma": 0}
    for role, rows in roles.items():
        for plain, tma in zip(rows[::2], rows[1::2]):  # each pair differs only in the TMA bit
            assert plain["loop_async_loads"] > tma["loop_async_loads"] and plain["loop_tma_loads"] == 0, plain
            assert tma["loop_tma_loads"] > 0 and tma["registers"] <= plain["registers"], (plain, tma)
            if role.startswith("backward"):  # 3.7.1: dI 36 B -> 0, dT 0; 3.6.0: dI 64 -> 0, dT 0 -> 28 B
                spills["plain"] += plain["spill_store_bytes"]
                spills["tma"] += tma["spill_store_bytes"]
            else:
                assert tma["spill_store_bytes"] == 0, tma
    assert spills["tma"] < spills["plain"], spills  # TMA spills less in all, under either version
    assert "| kernel_role | tiles | registers |" in r.stdout
