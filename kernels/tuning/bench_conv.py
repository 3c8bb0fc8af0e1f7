"""Tuning benchmarks of the convolution kernels: the untimed variants (conv3d_variants.py) in the
whole tower, the tile sweep, one block's step launch by launch, and compile reports for sm_90a.
The user's benchmark (layers, blocks, tower against cuDNN and torch.compile) is `ctvlp bench
conv`; this is what chooses the kernels it runs.

    python -m kernels.tuning.bench_conv OUT [--parts tower,tiles,launches,ptx] [--budget-s 300]

- tower: the tower under each candidate variant (tap K loop; swapped 64-channel tiles with the
  256- and the 512-voxel forward; the latter with its activation copies through L1, inference
  only), beside cuDNN eager and production's kernels in the same run, each row with its
  agreement with torch and a count of the launches that ran its variant;
- tiles: each kernel (forward, dgrad, wgrad) of each non-stem layer under every tile of
  TILE_GRID (forward and dgrad also SWAP_TILES), against cuDNN's same operation;
- launches: every kernel launch of one fused block's training step, timed alone and with its
  fusion flags off, then the step under each sweep tile;
- ptx (any machine, no GPU; not under TRITON_INTERPRET): the block's GEMMs compiled for sm_90a
  and what the compiler made of them (compile_report.py), with each forward's L2 traffic.
On CPU the interpreter checks agreement only. The record goes to OUT as conv-tuning-*.json.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

from ctvlp_dist.bench.conv import (BLOCKS, LAYERS, TOWER_COLS, TOWER_GPU_COLS, cuda_ms, eighth, rel, top_kernel,
                                   tower_rows, tower_setup, train_step)

from .compile_report import capture, trace_launches
from .conv3d_variants import SWAP_TILES, TILE_GRID, ConvVariant, is_swapped, tile_name

PARTS = ("tower", "tiles", "launches", "ptx")
INFERENCE_ONLY = "tap K loop, swapped 64-channel tiles, 512-voxel forward, activations through L1"
# name -> the variant the tower row runs under
TOWER_VARIANTS = {"tap K loop": ConvVariant("tap"),
                  "tap K loop, swapped 64-channel tiles": ConvVariant("tap", swap=True),
                  "tap K loop, swapped 64-channel tiles, 512-voxel forward": ConvVariant("tap", swap=SWAP_TILES[-1]),
                  INFERENCE_ONLY: ConvVariant("tap", swap=SWAP_TILES[-1], act_l1=True)}


def conv_launch_counts(launches) -> dict:
    """How many of these launches were convolutions, and how many ran the tap K loop, swapped
    operands or L1 copies: a tower row's proof that it timed the variant its name says."""
    conv = [meta for kernel, _, _, meta in launches if kernel.__name__ in GEMMS]
    return {"conv_launches": len(conv), "tap_launches": sum(bool(m.get("TAP")) for m in conv),
            "swapped_launches": sum(bool(m.get("SWAP")) for m in conv),
            "l1_launches": sum(m.get("ACT_CACHE") == ".ca" for m in conv)}


def tower_variant_rows(batch, dtype, device, ceil):
    """The tower: cuDNN eager (the baseline), production's kernels, then each variant, inference
    first, each Triton row counting the launches of its variant."""
    from contextlib import nullcontext

    from ctvlp_dist.models.resnet3d import ResNet3d18

    gpu = device == "cuda"
    ref, tri, x, batch, crop, width, base = tower_setup(batch, dtype, device)
    models = {"cudnn eager": (ref, nullcontext), "triton fused": (tri, nullcontext)}
    for name, v in TOWER_VARIANTS.items():
        m = ResNet3d18("k2s2", "bn", 32, True, "triton", width, v.rule).to(device, dtype).train()
        m.load_state_dict(ref.state_dict())
        models[f"triton fused, {name}"] = (m, v.active)

    def check(row, fn):
        row.update(conv_launch_counts(trace_launches(fn)))

    first = {}
    if gpu:
        import torch

        first["cudnn_kernel"] = top_kernel(train_step(ref, x.clone().requires_grad_(),
                                                      torch.randn(batch, ref.out_dim, device=device, dtype=dtype)))
    yield from tower_rows(models, ref, x, batch, crop, width, ceil, base, first, gpu, check=check,
                          inference_only=(f"triton fused, {INFERENCE_ONLY}",))


def tile_sweep(batch, dtype, device, ceil, budget_s: float) -> list[dict]:
    """Each kernel (forward, dgrad, wgrad) of each non-stem layer under every tile of
    TILE_GRID (forward and dgrad also under SWAP_TILES), against cuDNN's same
    operation (F.conv3d, conv3d_input, conv3d_weight): which tile should be the default, and which
    kernel lags most. Every timed result is checked against cuDNN's. Compiling a tile costs seconds, so once budget_s has passed,
    the remaining rows are recorded as skipped. CPU: layer1 alone at 1/8 size, agreement only."""
    import time

    import torch
    import torch.nn.functional as F

    from kernels.conv3d import KINDS, conv3d_dgrad, conv3d_forward, conv3d_wgrad

    gpu = device == "cuda"
    stop = time.time() + budget_s
    layers = [lay for lay in LAYERS if not lay[0].startswith("stem")][:None if gpu else 1]
    rows = []
    for name, cin, cout, sp, k, s, p in layers:
        if not gpu:
            cin, cout, sp = eighth(cin, cout, sp, floor=k)
        x = torch.randn(batch, cin, *sp, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
        w = (torch.randn(cout, cin, k, k, k, device=device) / (cin * k ** 3) ** 0.5).to(dtype)
        y = F.conv3d(x, w, None, s, p)
        dy = torch.randn_like(y).contiguous(memory_format=torch.channels_last_3d)
        s3, p3 = (s,) * 3, (p,) * 3
        cudnn = {"fwd": lambda: F.conv3d(x, w, None, s, p),
                 "dgrad": lambda: torch.nn.grad.conv3d_input(x.shape, w, dy, s, p),
                 "wgrad": lambda: torch.nn.grad.conv3d_weight(x, w.shape, dy, s, p)}
        ours = {"fwd": lambda v=None: conv3d_forward(x, w, None, s3, p3, tiles=v and v.rule),
                "dgrad": lambda v=None: conv3d_dgrad(dy, w, x.shape, s3, p3, x.dtype, tiles=v and v.rule),
                "wgrad": lambda v=None: conv3d_wgrad(x, dy, w.shape, s3, p3, w.dtype, tiles=v and v.rule)}
        fl = 2 * y[:, 0].numel() * cout * cin * k ** 3  # each of the three is one GEMM of this size
        for kind in KINDS:
            want = cudnn[kind]()
            base = cuda_ms(cudnn[kind]) if gpu else None
            default = meta_tile(capture(ours[kind])[0][3])  # what conv_tiles picks for this shape
            grid = TILE_GRID + (SWAP_TILES if kind != "wgrad" else [])
            for tile in grid + ([default] if gpu and default not in grid else []):
                row = {"layer": name, "kernel": kind, "tile": tile_name(tile), "default": tile == default}
                rows.append(row)
                if time.time() > stop:
                    row["skipped"] = "budget"
                    continue
                v = ConvVariant(tiles={kind: tile})
                try:
                    with v.active():
                        row["rel_err_vs_cudnn"] = rel(ours[kind](v), want)
                        if gpu:
                            ms = cuda_ms(lambda: ours[kind](v))
                            row.update(ms=round(ms, 3), cudnn_ms=round(base, 3), tflops=round(fl / ms / 1e9, 1),
                                       frac_of_bf16_matmul=round(fl / ms / 1e9 / ceil["bf16_matmul_tflops"], 3),
                                       speedup_vs_cudnn=round(base / ms, 3))
                except Exception as e:  # a tile that does not compile (shared memory) is a finding
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return rows


def meta_tile(meta: dict) -> tuple:
    """A launch's (BM, BN, BK, num_warps, num_stages[, "swap"])."""
    return tuple(meta[k] for k in ("BM", "BN", "BK", "num_warps", "num_stages")) + (("swap",) if meta.get("SWAP") else ())


def best_tiles(rows: list[dict]) -> list[dict]:
    """Per (layer, kernel): the fastest tile, and its gain over the default (the row marked
    `default`: the tile _tiles picks for that shape)."""
    out = {}
    for r in rows:
        if "ms" not in r:
            continue
        b = out.setdefault((r["layer"], r["kernel"]), {"layer": r["layer"], "kernel": r["kernel"], "default_ms": None,
                                                       "ms": float("inf")})
        if r.get("default"):
            b["default_ms"] = r["ms"]
        if r["ms"] < b["ms"]:
            b.update(best_tile=r["tile"], ms=r["ms"], tflops=r.get("tflops"), speedup_vs_cudnn=r.get("speedup_vs_cudnn"))
    for b in out.values():
        if b["default_ms"]:
            b["gain_vs_default"] = round(b["default_ms"] / b["ms"], 3)
    return list(out.values())


LAUNCH_BLOCKS = ("layer1.0", "layer2.0", "layer4.1")
GEMMS = ("conv_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel", "conv_fwd_variant", "conv_dgrad_variant", "conv_wgrad_variant")


def time_ms(fn, gpu: bool) -> float:
    """CUDA events on the GPU; one wall-clock run on CPU (the interpreter: no speed figure)."""
    import time

    if gpu:
        return cuda_ms(fn, reps=5)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def launches(batch, dtype, device, budget_s: float) -> tuple[list[dict], list[dict]]:
    """Every kernel launch of one fused training step of a block (forward + backward), in order,
    replayed alone and timed; each GEMM also with its fusion flags off (the plain convolution at
    the same tile). Says what each fused prologue/epilogue costs, and how much of the step is
    spent outside the kernels (torch glue: merging statistics, weight permutes, partial sums).
    Then the step again under each tile of TILE_GRID (budget_s; CPU: the first tile), timing its
    GEMM launches: the fused variants' best tiles, which need not be the plain kernels'."""
    import time

    import torch

    from ctvlp_dist.models.resnet3d import BasicBlock3d

    gpu = device == "cuda"
    stop = time.time() + budget_s
    rows, sweep = [], []
    for name, cin, cout, stride, sp in (b for b in BLOCKS if b[0] in LAUNCH_BLOCKS[:None if gpu else 1]):
        if not gpu:
            cin, cout, sp = eighth(cin, cout, sp)
        blk = BasicBlock3d(cin, cout, stride, "bn", 1, "triton").to(device, dtype).train()
        x = torch.randn(batch, cin, *sp, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last_3d).requires_grad_()
        g = torch.randn_like(blk(x))
        step = train_step(blk, x, g)
        step()  # compiles
        launches = trace_launches(step)
        step_ms = time_ms(step, gpu)
        total = 0.0
        for i, (kernel, grid, args, meta) in enumerate(launches):
            ms = time_ms(lambda: kernel[grid](*args, **meta), gpu)
            total += ms
            row = {"block": name, "i": i, **launch_name(kernel, meta), "grid": "x".join(map(str, grid)),
                   "ms": round(ms, 3)}
            if kernel.__name__ in GEMMS:
                plain = {k: False if isinstance(val, bool) else val for k, val in meta.items()}
                row["plain_ms"] = round(time_ms(lambda: kernel[grid](*args, **plain), gpu), 3)
                row["fusion_cost"] = round(ms / row["plain_ms"], 2) if row["plain_ms"] else None
                if gpu:
                    row["tflops"] = round(gemm_flops(kernel, args, meta) / ms / 1e9, 1)
            rows.append(row)
        rows.append({"block": name, "i": len(launches), "kernel": "(whole step)", "ms": round(step_ms, 3),
                     "launches_ms": round(total, 3), "outside_kernels_ms": round(step_ms - total, 3)})
        default = {i: row["tile"] for i, row in enumerate(rows[-len(launches) - 1:-1])}
        for tile in TILE_GRID if gpu else TILE_GRID[:1]:
            if time.time() > stop:
                sweep.append({"block": name, "tile": tile_name(tile), "skipped": "budget"})
                continue
            v = ConvVariant(tiles=dict.fromkeys(("fwd", "dgrad", "wgrad"), tile))
            tiled = BasicBlock3d(cin, cout, stride, "bn", 1, "triton", v.rule).to(device, dtype).train()
            tiled.load_state_dict(blk.state_dict())
            try:
                with v.active():
                    tiled_step = train_step(tiled, x, g)
                    tiled_step()  # compiles this tile's variants
                    traced = trace_launches(tiled_step)
                for i, (kernel, grid, args, meta) in enumerate(traced):
                    if kernel.__name__ in GEMMS:
                        ms = time_ms(lambda: kernel[grid](*args, **meta), gpu)
                        n = launch_name(kernel, meta)
                        sweep.append({"layer": f"{name} #{i}", "kernel": f"{n['kernel']} {n['fused']}",
                                      "tile": n["tile"], "default": n["tile"] == default[i], "ms": round(ms, 3),
                                      "tflops": round(gemm_flops(kernel, args, meta) / ms / 1e9, 1) if gpu else None})
            except Exception as e:  # a tile that does not compile (shared memory) is a finding
                sweep.append({"block": name, "tile": tile_name(tile), "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return rows, sweep


def launch_name(kernel, meta) -> dict:
    flags = [k for k, v in meta.items() if v is True]
    return {"kernel": kernel.__name__, "fused": "+".join(flags) or "-",
            "tile": tile_name(meta_tile(meta)) if "BM" in meta else ""}


def fwd_l2_bytes(kernel, grid, args, meta) -> int:
    """Bytes a forward launch moves through L2 (its async copies bypass L1), counted from its
    grid: every output-channel tile re-reads the activation once per tap (M x K), every voxel
    tile re-reads the weight (K x Cout; masked channel columns load nothing), and the output
    (and a residual) pass once. Rows a padding mask skips are counted too (a few percent at
    3^3): an upper bound. At layer1 this is about 40x the fewest bytes, which is why L2, not
    HBM, is the byte ceiling to compare with."""
    v = dict(zip(kernel.arg_names, args), **meta)
    e = v["X"].element_size()
    M = math.prod(v[k] for k in ("Nb", "Do", "Ho", "Wo"))
    K = v["Cin"] * v["KD"] * v["KH"] * v["KW"]
    m_tiles, n_tiles = grid[:2]
    return e * (n_tiles * M * K + m_tiles * K * v["Cout"] + M * v["Cout"] * (1 + bool(v["HAS_RES"])))


def gemm_flops(kernel, args, meta) -> int:
    """2 M N K of a conv GEMM launch (forward, dgrad and wgrad of one convolution are equal)."""
    v = dict(zip(kernel.arg_names, args), **meta)
    return 2 * math.prod(v[k] for k in ("Nb", "Do", "Ho", "Wo", "Cout", "Cin", "KD", "KH", "KW"))


def ptx_rows() -> list[dict]:
    """Static facts of the block's four GEMM launches compiled for sm_90a (no GPU needed): each
    3^3 layer of the seed tower at the default tile, flat and tap K loops, and layer1 under every
    tile of the sweep (forward and dgrad also under SWAP_TILES). What it shows: wgmma in use,
    operand tiles loaded by pipelined async copies (none by synchronous loads), registers, spills
    and shared memory per tile, the SASS main loop's instructions per iteration against its MMAs,
    and the share of the MMA rate its shared-memory traffic allows (smem_cap)."""
    from ctvlp_dist.bench.conv import LAYERS

    from .compile_report import conv_block_launches, report

    rows = []
    for i, (name, cin, cout, sp, k, s, p) in enumerate(lay for lay in LAYERS if lay[4] == 3):
        for tile in [None] + (TILE_GRID + SWAP_TILES if i == 0 else []):
            swap = tile is not None and is_swapped(tile)
            for loop in ("flat", "tap") if tile is None or swap else ("flat",):
                kinds = ("fwd", "dgrad") if swap else ("fwd", "dgrad", "wgrad")
                v = ConvVariant(loop, tiles=dict.fromkeys(kinds, tile) if tile else None)
                launches = conv_block_launches(cin, cout, sp, 8, stride=s, variant=v)
                for variant, launch in launches.items():
                    if swap and variant.startswith("wgrad"):
                        continue
                    r = report(*launch)
                    if launch[0].__name__ in ("conv_fwd_kernel", "conv_fwd_variant"):
                        r["l2_GB"] = round(fwd_l2_bytes(*launch) / 1e9, 2)
                    rows.append({"layer": name, "variant": variant, "k_loop": loop,
                                 "tile": tile_name(tile or meta_tile(r)), **r})
    return rows + ptx_inference_rows()


def ptx_inference_rows() -> list[dict]:
    """Layer1's inference forward (bias, residual, ReLU; BN folded) at the default tile and the
    512-voxel swapped one, tap loop, with and without act_l1: what the L1-allocating copies cost
    in registers and issue, and how many of the loop's copies take L1."""
    import torch

    from ctvlp_dist.bench.conv import LAYERS
    from kernels.conv3d import conv3d_forward

    from .compile_report import capture, report

    name, cin, cout, sp, k, s, p = LAYERS[2]
    x = torch.empty(8, cin, *sp, dtype=torch.bfloat16, device="meta").contiguous(memory_format=torch.channels_last_3d)
    w = torch.empty(cout, cin, k, k, k, dtype=torch.bfloat16, device="meta")
    b = torch.empty(cout, device="meta")
    rows = []
    for tile in (None, SWAP_TILES[-1]):
        for l1 in (False, True):
            v = ConvVariant("tap", act_l1=l1, tiles={"fwd": tile} if tile else None)
            with v.active():
                launch = capture(conv3d_forward, x, w, b, s, p, residual=x, relu=True, tiles=v.rule)[0]
            r = report(*launch)
            rows.append({"layer": name, "variant": "inference fwd+bias+residual+relu" + (
                ", activations through L1" if l1 else ""), "k_loop": "tap", "tile": tile_name(tile or meta_tile(r)), **r,
                "l2_GB": round(fwd_l2_bytes(*launch) / 1e9, 2)})
    return rows

def l2_ceiling() -> dict:
    """The L2 read rate (l2_probe.py): the ceiling of our tiles' operand re-reads."""
    try:
        from .l2_probe import l2_read_GBps

        return {"l2_read_GBps": round(l2_read_GBps(), 1)}
    except Exception as e:  # not fatal: the other ceilings still mean something
        return {"l2_read_error": f"{type(e).__name__}: {str(e)[:160]}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.tuning.bench_conv", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for the record (copy it to benchmarks/results/)")
    ap.add_argument("--parts", default="tower", help=f"comma-separated, from {', '.join(PARTS)}")
    ap.add_argument("--budget-s", type=float, default=300.0, help="tiles/launches: stop compiling new tiles after this")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        ap.error(f"--parts: unknown {sorted(set(parts) - set(PARTS))}; choose from {', '.join(PARTS)}")
    if "ptx" in parts and os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("part ptx compiles for sm_90a and needs the kernels compiled, not interpreted: run it without "
                 "TRITON_INTERPRET=1")
    import torch

    from ctvlp_dist.bench.loss import gpu_ceilings
    from ctvlp_dist.records import markdown_table, write_result

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    batch = args.batch if gpu else 1
    ceil = {**gpu_ceilings(), **l2_ceiling()} if gpu and set(parts) - {"ptx"} else {}
    out = {"batch": batch, "dtype": str(dtype).split(".")[-1], "ceilings": ceil, "parts": parts}

    def show(r):
        print(r, flush=True)
        return r

    if "tower" in parts:
        out["tower"] = [show(r) for r in tower_variant_rows(args.batch, dtype, device, ceil)]
        print(markdown_table(out["tower"], TOWER_COLS + ["conv_launches", "tap_launches", "swapped_launches",
                                                         "l1_launches"] + (TOWER_GPU_COLS if gpu else [])))
    if "tiles" in parts:
        out["tiles"] = [show(r) for r in tile_sweep(batch, dtype, device, ceil, args.budget_s)]
        out["best_tiles"] = best_tiles(out["tiles"])
        print(markdown_table(out["best_tiles"] if gpu else out["tiles"],
                             ["layer", "kernel", "best_tile", "ms", "tflops", "speedup_vs_cudnn", "gain_vs_default"] if gpu
                             else ["layer", "kernel", "tile", "rel_err_vs_cudnn", "error"]))
    if "launches" in parts:
        out["launches"], out["launch_tiles"] = launches(batch, dtype, device, args.budget_s)
        out["launch_best_tiles"] = best_tiles(out["launch_tiles"])
        print(markdown_table(out["launches"], ["block", "i", "kernel", "fused", "tile", "grid", "ms", "plain_ms",
                                               "fusion_cost", "tflops", "launches_ms", "outside_kernels_ms"]))
    if "ptx" in parts:
        out["ptx_target"] = "sm_90a (H100), bf16, batch 8 at the 96x192x192 crop; compiled here, static facts, no timing"
        out["ptx"] = [show(r) for r in ptx_rows()]
        print(markdown_table(out["ptx"], ["layer", "variant", "k_loop", "tile", "wgmma", "loop_async_loads",
                                          "loop_sync_tile_loads", "loop_sass_instructions", "loop_sass_mma", "registers",
                                          "spill_store_bytes", "shared_bytes", "smem_cap", "l2_GB", "loop_l1_copies"]))
    path = write_result(args.out, "conv-tuning", out, sys.argv)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
