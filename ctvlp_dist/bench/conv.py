"""`ctvlp bench conv`: the Triton conv3d (model.conv_impl=triton) against cuDNN, in three parts
(bench.conv_parts):

- layers: each convolution of the seed model at its 96x192x192 crop (k2s2 stem: 48x96^2, 24x48^2,
  12x24^2, 6x12^2 at 64..512 channels) plus the standard 7^3 stride-2 stem, alone;
- blocks: each residual block in training mode (conv, BN, ReLU, shortcut), the fused Triton
  block (kernels/conv3d_block.py) against the torch block on cuDNN;
- tower: the whole ResNet3d18 (k2s2, BN), inference first, then a training step (forward +
  backward), against cuDNN eager and, with bench.conv_compile, torch.compile(mode="max-autotune";
  it replays CUDA graphs itself); inference also replayed as a CUDA graph (embedding extraction
  without per-launch CPU cost), still against cuDNN eager; our tower runs under each candidate
  default (flat or tap K loop, conv3d.K_LOOP; swapped 64-channel tiles, conv3d.SWAP_NARROW),
  each row with its own agreement with torch and a count of the launches that ran its variant;
- tiles (not a default part): each kernel of each layer under every tile of the sweep grid,
  against cuDNN's same operation, to choose the tile defaults from measurements;
- launches (not a default part): every kernel launch of one fused block's training step, timed
  alone and with its fusion flags off: where a block's time goes beyond its GEMMs;
- ptx (not a default part; any machine, no GPU): the block's kernels compiled for sm_90a, and
  what the compiler made of them (kernels/compile_report.py).

Batch bench.conv_batch, bf16 on GPU; CUDA events, median; the same run measures the bf16
matmul and copy ceilings (METHOD.md), and each rate is reported against them. FLOPs are 2 M Cout
K per GEMM (forward; backward 2 more); a layer's bytes are the fewest possible (input, weight,
output once each). cuDNN runs in channels_last_3d; the profiler's top kernel name is recorded,
so a silent fallback (torch 2.9.0's bf16 conv3d) would show. CPU: the interpreter says nothing
about speed, so CPU runs only check that each part agrees with torch, at 1/8 of each spatial
size (blocks and tower also at 1/8 of the channels).
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext

from .record import markdown_table, write_result

# (name, Cin, Cout, input spatial at the 96x192x192 crop, kernel, stride, padding)
LAYERS = [("stem k2s2", 1, 64, (96, 192, 192), 2, 2, 0), ("stem 7^3 s2", 1, 64, (96, 192, 192), 7, 2, 3),
          ("layer1 3^3", 64, 64, (48, 96, 96), 3, 1, 1), ("layer2 3^3 s2", 64, 128, (48, 96, 96), 3, 2, 1),
          ("layer2 3^3", 128, 128, (24, 48, 48), 3, 1, 1), ("layer2 down 1^3 s2", 64, 128, (48, 96, 96), 1, 2, 0),
          ("layer3 3^3", 256, 256, (12, 24, 24), 3, 1, 1), ("layer4 3^3", 512, 512, (6, 12, 12), 3, 1, 1)]


def _cuda_ms(fn, reps: int = 10) -> float:
    from .loss import _cuda_time

    return _cuda_time(fn, reps=reps, warmup=1) * 1e3


def _top_kernel(fn) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.device_time_total > 0]
    return max(ev, key=lambda e: e.device_time_total).key[:80] if ev else "?"


def _layer(name, cin, cout, sp, k, s, p, batch, dtype, device, scale=1, ceil=None):
    import torch
    import torch.nn.functional as F

    from kernels.compile_report import capture
    from kernels.conv3d import conv3d_forward, conv3d_triton

    sp = tuple(max(k, x // scale) for x in sp)
    x = torch.randn(batch, cin, *sp, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(cout, cin, k, k, k, device=device) / (cin * k ** 3) ** 0.5).to(dtype)
    y_ref = F.conv3d(x, w, None, s, p)
    y = conv3d_triton(x, w, None, s, p)
    err = float((y.float() - y_ref.float()).norm() / y_ref.float().norm())
    l2 = fwd_l2_bytes(*capture(conv3d_forward, x.to("meta"), w.to("meta"), None, s, p)[0])
    row = {"layer": name, "in": "x".join(map(str, sp)), "cin": cin, "cout": cout, "rel_err_vs_torch": round(err, 5),
           "l2_GB_fwd": round(l2 / 1e9, 2)}
    if device != "cuda":
        return row
    M, K = y[:, 0].numel(), cin * k ** 3
    fl = 2 * M * cout * K
    bytes_min = (x.numel() + w.numel() + y.numel()) * x.element_size()
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn_like(y_ref)

    def fb(fn):
        def run():
            xg.grad = wg.grad = None
            fn(xg, wg, None, s, p).backward(g)
        return run

    t = {"triton_fwd_ms": _cuda_ms(lambda: conv3d_triton(x, w, None, s, p)),
         "cudnn_fwd_ms": _cuda_ms(lambda: F.conv3d(x, w, None, s, p)),
         "triton_fwdbwd_ms": _cuda_ms(fb(conv3d_triton), reps=5), "cudnn_fwdbwd_ms": _cuda_ms(fb(F.conv3d), reps=5)}
    row.update({k: round(v, 3) for k, v in t.items()})
    row["gflop_fwd"] = round(fl / 1e9, 1)
    row["triton_fwd_tflops"] = round(fl / t["triton_fwd_ms"] / 1e9, 1)
    row["cudnn_fwd_tflops"] = round(fl / t["cudnn_fwd_ms"] / 1e9, 1)
    row["min_MB"] = round(bytes_min / 2 ** 20, 1)
    row["triton_fwd_GBps"] = round(bytes_min / t["triton_fwd_ms"] / 1e6, 1)
    if ceil:  # the forward's lower bound: its FLOPs at the matmul ceiling or its bytes at the copy one
        bound = max(fl / ceil["bf16_matmul_tflops"] / 1e9, bytes_min / ceil["copy_GBps"] / 1e6)
        row["roofline_fwd_ms"] = round(bound, 3)
        row["triton_frac_of_roofline"] = round(bound / t["triton_fwd_ms"], 3)
        row["cudnn_frac_of_roofline"] = round(bound / t["cudnn_fwd_ms"], 3)
    row["triton_fwd_l2_GBps"] = round(l2 / t["triton_fwd_ms"] / 1e6, 1)
    if ceil.get("l2_read_GBps"):  # the same bytes at the L2 read ceiling: our tiles' re-reads, not the layer's
        row["l2_bound_ms"] = round(l2 / ceil["l2_read_GBps"] / 1e6, 3)
        row["triton_frac_of_l2_bound"] = round(row["l2_bound_ms"] / t["triton_fwd_ms"], 3)
    row["fwd_speedup_vs_cudnn"] = round(t["cudnn_fwd_ms"] / t["triton_fwd_ms"], 3)
    row["fwdbwd_speedup_vs_cudnn"] = round(t["cudnn_fwdbwd_ms"] / t["triton_fwdbwd_ms"], 3)
    row["cudnn_kernel"] = _top_kernel(lambda: F.conv3d(x, w, None, s, p))
    return row


# The residual blocks of the seed tower at the 96x192x192 crop: (name, Cin, Cout, stride, input spatial)
BLOCKS = [("layer1.0", 64, 64, 1, (48, 96, 96)), ("layer2.0", 64, 128, 2, (48, 96, 96)),
          ("layer2.1", 128, 128, 1, (24, 48, 48)), ("layer3.0", 128, 256, 2, (24, 48, 48)),
          ("layer3.1", 256, 256, 1, (12, 24, 24)), ("layer4.0", 256, 512, 2, (12, 24, 24)),
          ("layer4.1", 512, 512, 1, (6, 12, 12))]


def _eighth(cin: int, cout: int, sp, floor: int = 2):
    """CPU (interpreter) size: 1/8 of the channels and of each spatial size."""
    return max(1, cin // 8), max(1, cout // 8), tuple(max(floor, v // 8) for v in sp)


def _twins(make, device, dtype):
    """The same module twice, conv_impl torch and triton, with one state."""
    ref, tri = make("torch").to(device, dtype), make("triton").to(device, dtype)
    tri.load_state_dict(ref.state_dict())
    return ref.train(), tri.train()


def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float(f"{float((a - b).norm() / b.norm().clamp_min(1e-30)):.3g}")


def _agree(ref, tri, x) -> dict:
    """Output and input gradient of the triton module against the torch one, training mode."""
    import torch

    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    ys = [m(t) for m, t in zip((ref, tri), xs)]
    g = torch.randn_like(ys[0])
    for y in ys:
        y.backward(g)
    return {"rel_err_y": _rel(ys[1], ys[0]), "rel_err_dx": _rel(xs[1].grad, xs[0].grad)}


def saved_mb(m, x) -> float:
    """MB of activations that autograd keeps for the backward of m(x) (each storage once; not the
    input, not the parameters): what fusing BN and ReLU into the convolutions reduces."""
    import torch

    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    for t in (x, *m.parameters()):  # they exist anyway
        seen.pop(t.untyped_storage().data_ptr(), None)
    return float(f"{sum(seen.values()) / 2 ** 20:.3g}")


def peak_mb(fn) -> float:
    """MB allocated at the peak of one call of fn beyond what was allocated before it (GPU): the
    fused block's transient buffers (BN maps formed by passes) show here, not in saved_mb."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)


def _train_step(m, x, g):
    def run():
        m.zero_grad(set_to_none=True)
        x.grad = None
        m(x).backward(g)
    return run


def _block(name, cin, cout, stride, sp, batch, dtype, device, ceil):
    """One residual block, training step. FLOPs: its convolutions' GEMMs, 3x the forward."""
    import torch

    from ..models.resnet3d import BasicBlock3d

    gpu = device == "cuda"
    if not gpu:
        cin, cout, sp = _eighth(cin, cout, sp)
    ref, tri = _twins(lambda impl: BasicBlock3d(cin, cout, stride, "bn", 1, impl), device, dtype)
    x = torch.randn(batch, cin, *sp, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    row = {"block": name, "in": "x".join(map(str, sp)), "cin": cin, "cout": cout, **_agree(ref, tri, x)}
    xs = x.clone().requires_grad_()
    row.update(saved_MB_triton=saved_mb(tri, xs), saved_MB_torch=saved_mb(ref, xs))
    if not gpu:
        return row
    xg = x.clone().requires_grad_()
    g = torch.randn_like(ref(x))
    t = {"triton_fwdbwd_ms": _cuda_ms(_train_step(tri, xg, g), reps=5),
         "cudnn_fwdbwd_ms": _cuda_ms(_train_step(ref, xg, g), reps=5)}
    row.update({k: round(v, 3) for k, v in t.items()})
    row.update(peak_MB_triton=peak_mb(_train_step(tri, xg, g)), peak_MB_torch=peak_mb(_train_step(ref, xg, g)))
    row["fwdbwd_speedup_vs_cudnn"] = round(t["cudnn_fwdbwd_ms"] / t["triton_fwdbwd_ms"], 3)
    m_out = batch * math.prod(-(-v // stride) for v in sp)  # output positions of every conv in the block
    fl = 3 * 2 * m_out * cout * (27 * cin + 27 * cout + (cin if tri.down is not None else 0))
    row["triton_tflops"] = round(fl / t["triton_fwdbwd_ms"] / 1e9, 1)
    row["cudnn_tflops"] = round(fl / t["cudnn_fwdbwd_ms"] / 1e9, 1)
    row["triton_frac_of_bf16_matmul"] = round(row["triton_tflops"] / ceil["bf16_matmul_tflops"], 3)
    return row


def _cuda_graph(fn):
    """fn captured once as a CUDA graph (after warm-up runs on a side stream, which compile the
    Triton kernels and let cuDNN choose its algorithms); returns its replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _conv_launch_counts(launches) -> dict:
    """How many of these launches were convolutions, and how many ran the tap K loop or swapped
    operands: a tower row's proof that it timed the variant its name says."""
    conv = [meta for kernel, _, _, meta in launches if kernel.__name__ in _GEMMS]
    return {"conv_launches": len(conv), "tap_launches": sum(bool(m.get("TAP")) for m in conv),
            "swapped_launches": sum(bool(m.get("SWAP")) for m in conv),
            "l1_launches": sum(m.get("ACT_CACHE") == ".ca" for m in conv)}


INFERENCE_ONLY = "triton fused, tap K loop, swapped 64-channel tiles, 512-voxel forward, activations through L1"


def _variant(loop: str, swap, l1: bool = False):
    """The convolutions' options for a tower row: the K loop (conv3d.K_LOOP), SWAP_NARROW (False,
    True, or a forward tile to swap with) and ACT_L1."""
    from contextlib import ExitStack

    from kernels.conv3d import act_l1, k_loop, swap_narrow

    stack = ExitStack()
    stack.enter_context(k_loop(loop))
    stack.enter_context(swap_narrow(bool(swap), fwd_tile=swap if isinstance(swap, tuple) else None))
    stack.enter_context(act_l1(l1))
    return stack


def _tower(batch, dtype, device, ceil, compile_too: bool):
    """The whole tower, inference first (eval, no autograd: BN folded on the Triton side; the
    1.5x goal not yet met), then a training step (BN batch statistics, forward + backward of all
    parameters and the input). Yields one row per (mode, implementation) as soon as it is
    measured, so that a device call cut short by its budget still logs the rows before the cut.
    Each Triton row also records its own agreement with the torch tower under its K loop and
    tiles: a variant that becomes a default must have been checked in bf16 on the chip."""
    import copy
    import time
    from types import SimpleNamespace

    import torch

    from kernels.compile_report import trace_launches
    from kernels.conv3d import SWAP_TILES

    from ..models.flops import image_tower_train_flops
    from ..models.resnet3d import ResNet3d18

    gpu = device == "cuda"
    # CPU: 4 scans, so that layer4's BatchNorms see 4 values per channel; with 2, their input
    # gradient is zero in exact arithmetic, and a comparison would be of rounding noise
    width, crop = (64, (96, 192, 192)) if gpu else (8, (8, 16, 16))
    batch = batch if gpu else 4
    ref, tri = _twins(lambda impl: ResNet3d18("k2s2", "bn", 32, True, impl, width), device, dtype)
    x = torch.randn(batch, 1, *crop, device=device, dtype=dtype)
    xs = x.clone().requires_grad_()
    base = {"in": "x".join(map(str, crop)), "width": width, "batch": batch,
            "saved_MB_triton": saved_mb(tri, xs), "saved_MB_torch": saved_mb(ref, xs)}
    train_fl = image_tower_train_flops(SimpleNamespace(stem="k2s2", norm="bn", gn_groups=32, width=width), crop) * batch
    # name -> (module, conv options for _variant: K loop, SWAP_NARROW, ACT_L1). The last row (its
    # option changes only the forwards' loads) runs in the inference modes alone, to spare time.
    models = {"cudnn eager": (ref, ("flat", False)), "triton fused": (tri, ("flat", False)),
              "triton fused, tap K loop": (tri, ("tap", False)),
              "triton fused, tap K loop, swapped 64-channel tiles": (tri, ("tap", True)),
              "triton fused, tap K loop, swapped 64-channel tiles, 512-voxel forward": (tri, ("tap", SWAP_TILES[-1])),
              INFERENCE_ONLY: (tri, ("tap", SWAP_TILES[-1], True))}
    first = {}
    if gpu:
        first["cudnn_kernel"] = _top_kernel(_train_step(ref, xs, torch.randn(batch, ref.out_dim, device=device,
                                                                              dtype=dtype)))
    if compile_too:
        comp = copy.deepcopy(ref)
        t0 = time.time()
        try:
            models["torch.compile max-autotune"] = (torch.compile(comp, mode="max-autotune"), ("flat", False))
        except Exception as e:  # recorded, not fatal: the other rows still mean something
            first["compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        first["compile_wrap_s"] = round(time.time() - t0, 1)
    xg = x.clone().requires_grad_()
    g = torch.randn(batch, ref.out_dim, device=device, dtype=dtype)
    # (mode, FLOPs, replayed as a CUDA graph, the cuDNN-eager mode it is compared with)
    modes = [("inference", train_fl / 3, False, "inference"), ("train fwd+bwd", train_fl, False, "train fwd+bwd")]
    if gpu:
        modes.insert(1, ("inference, CUDA graph", train_fl / 3, True, "inference"))
    cudnn_ms = {}
    for mode, fl, graph, base_mode in modes:
        for name, (m, opts) in models.items():
            if graph and name.startswith("torch.compile"):
                continue  # max-autotune already replays CUDA graphs
            if mode == "train fwd+bwd" and name == INFERENCE_ONLY:
                continue
            row = {"tower": mode, "impl": name, **base, **first}
            first = {}
            t0 = time.time()
            try:
                if mode == "train fwd+bwd":
                    m.train(), ref.train()
                    if m is not ref:
                        with _variant(*opts):
                            launched = trace_launches(lambda: row.update(_agree(ref, m, x)))
                        row.update(_conv_launch_counts(launched))
                    step = _train_step(m, xg, g)

                    def fn(step=step, opts=opts):
                        with _variant(*opts):
                            step()
                else:
                    m.eval(), ref.eval()

                    def fn(m=m, opts=opts):
                        with torch.no_grad(), _variant(*opts):
                            return m(x)
                    if m is not ref and not graph:
                        got = {}
                        launched = trace_launches(lambda: got.setdefault("y", fn()))
                        with torch.no_grad():
                            row["rel_err_inference"] = _rel(got["y"], ref(x))
                        row.update(_conv_launch_counts(launched))
                    if graph:  # embedding extraction without per-launch CPU cost
                        fn = _cuda_graph(fn)
                if gpu:
                    fn()  # the first calls (with the agreement's) compile, torch.compile autotunes: timed apart
                    torch.cuda.synchronize()
                    row["first_call_s"] = round(time.time() - t0, 1)
                    ms = _cuda_ms(fn, reps=5)
                    row.update(ms=round(ms, 2), scans_per_s=round(batch / ms * 1e3, 1), tflops=round(fl / ms / 1e9, 1),
                               frac_of_bf16_matmul=round(fl / ms / 1e9 / ceil["bf16_matmul_tflops"], 3))
                    if name == "cudnn eager":
                        cudnn_ms[mode] = ms
                    if base_mode in cudnn_ms:  # the goals' baseline: cuDNN eager, launched as torch launches it
                        row["speedup_vs_cudnn"] = round(cudnn_ms[base_mode] / ms, 3)
                    if graph and mode in cudnn_ms:  # and against cuDNN replayed as a graph too
                        row["speedup_vs_cudnn_graph"] = round(cudnn_ms[mode] / ms, 3)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            yield row
    ref.train(), tri.train()


def _tile_sweep(batch, dtype, device, ceil, budget_s: float) -> list[dict]:
    """Each kernel (forward, dgrad, wgrad) of each non-stem layer under every tile of
    kernels.conv3d.TILE_GRID (forward and dgrad also under SWAP_TILES), against cuDNN's same
    operation (F.conv3d, conv3d_input, conv3d_weight): which tile should be the default, and which
    kernel lags most. Every timed result is checked against cuDNN's. Compiling a tile costs seconds, so once budget_s has passed,
    the remaining rows are recorded as skipped. CPU: layer1 alone at 1/8 size, agreement only."""
    import time

    import torch
    import torch.nn.functional as F

    from kernels.compile_report import capture
    from kernels.conv3d import KINDS, SWAP_TILES, TILE_GRID, conv3d_dgrad, conv3d_forward, conv3d_wgrad, tile_override

    gpu = device == "cuda"
    stop = time.time() + budget_s
    layers = [lay for lay in LAYERS if not lay[0].startswith("stem")][:None if gpu else 1]
    rows = []
    for name, cin, cout, sp, k, s, p in layers:
        if not gpu:
            cin, cout, sp = _eighth(cin, cout, sp, floor=k)
        x = torch.randn(batch, cin, *sp, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
        w = (torch.randn(cout, cin, k, k, k, device=device) / (cin * k ** 3) ** 0.5).to(dtype)
        y = F.conv3d(x, w, None, s, p)
        dy = torch.randn_like(y).contiguous(memory_format=torch.channels_last_3d)
        s3, p3 = (s,) * 3, (p,) * 3
        cudnn = {"fwd": lambda: F.conv3d(x, w, None, s, p),
                 "dgrad": lambda: torch.nn.grad.conv3d_input(x.shape, w, dy, s, p),
                 "wgrad": lambda: torch.nn.grad.conv3d_weight(x, w.shape, dy, s, p)}
        ours = {"fwd": lambda: conv3d_forward(x, w, None, s3, p3),
                "dgrad": lambda: conv3d_dgrad(dy, w, x.shape, s3, p3, x.dtype),
                "wgrad": lambda: conv3d_wgrad(x, dy, w.shape, s3, p3, w.dtype)}
        fl = 2 * y[:, 0].numel() * cout * cin * k ** 3  # each of the three is one GEMM of this size
        for kind in KINDS:
            want = cudnn[kind]()
            base = _cuda_ms(cudnn[kind]) if gpu else None
            default = _meta_tile(capture(ours[kind])[0][3])  # what _tiles picks for this shape
            grid = TILE_GRID + (SWAP_TILES if kind != "wgrad" else [])
            for tile in grid + ([default] if gpu and default not in grid else []):
                row = {"layer": name, "kernel": kind, "tile": _tile_name(tile), "default": tile == default}
                rows.append(row)
                if time.time() > stop:
                    row["skipped"] = "budget"
                    continue
                try:
                    with tile_override(tile, kind):
                        row["rel_err_vs_cudnn"] = _rel(ours[kind](), want)
                        if gpu:
                            ms = _cuda_ms(ours[kind])
                            row.update(ms=round(ms, 3), cudnn_ms=round(base, 3), tflops=round(fl / ms / 1e9, 1),
                                       frac_of_bf16_matmul=round(fl / ms / 1e9 / ceil["bf16_matmul_tflops"], 3),
                                       speedup_vs_cudnn=round(base / ms, 3))
                except Exception as e:  # a tile that does not compile (shared memory) is a finding
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return rows


def _tile_name(tile) -> str:
    from kernels.conv3d import is_swapped

    return "x".join(map(str, tile[:3])) + f" w{tile[3]} s{tile[4]}" + (" swap" if is_swapped(tile) else "")


def _meta_tile(meta: dict) -> tuple:
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
_GEMMS = ("_conv_fwd", "_conv_dgrad", "_conv_wgrad")


def _time_ms(fn, gpu: bool) -> float:
    """CUDA events on the GPU; one wall-clock run on CPU (the interpreter: no speed figure)."""
    import time

    if gpu:
        return _cuda_ms(fn, reps=5)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _launches(batch, dtype, device, budget_s: float) -> tuple[list[dict], list[dict]]:
    """Every kernel launch of one fused training step of a block (forward + backward), in order,
    replayed alone and timed; each GEMM also with its fusion flags off (the plain convolution at
    the same tile). Says what each fused prologue/epilogue costs, and how much of the step is
    spent outside the kernels (torch glue: merging statistics, weight permutes, partial sums).
    Then the step again under each tile of TILE_GRID (budget_s; CPU: the first tile), timing its
    GEMM launches: the fused variants' best tiles, which need not be the plain kernels'."""
    import time

    import torch

    from kernels.compile_report import trace_launches
    from kernels.conv3d import TILE_GRID, tile_override

    from ..models.resnet3d import BasicBlock3d

    gpu = device == "cuda"
    stop = time.time() + budget_s
    rows, sweep = [], []
    for name, cin, cout, stride, sp in (b for b in BLOCKS if b[0] in LAUNCH_BLOCKS[:None if gpu else 1]):
        if not gpu:
            cin, cout, sp = _eighth(cin, cout, sp)
        blk = BasicBlock3d(cin, cout, stride, "bn", 1, "triton").to(device, dtype).train()
        x = torch.randn(batch, cin, *sp, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last_3d).requires_grad_()
        g = torch.randn_like(blk(x))
        step = _train_step(blk, x, g)
        step()  # compiles
        launches = trace_launches(step)
        step_ms = _time_ms(step, gpu)
        total = 0.0
        for i, (kernel, grid, args, meta) in enumerate(launches):
            ms = _time_ms(lambda: kernel[grid](*args, **meta), gpu)
            total += ms
            row = {"block": name, "i": i, **_launch_name(kernel, meta), "grid": "x".join(map(str, grid)),
                   "ms": round(ms, 3)}
            if kernel.__name__ in _GEMMS:
                plain = {k: False if isinstance(val, bool) else val for k, val in meta.items()}
                row["plain_ms"] = round(_time_ms(lambda: kernel[grid](*args, **plain), gpu), 3)
                row["fusion_cost"] = round(ms / row["plain_ms"], 2) if row["plain_ms"] else None
                if gpu:
                    row["tflops"] = round(_gemm_flops(kernel, args, meta) / ms / 1e9, 1)
            rows.append(row)
        rows.append({"block": name, "i": len(launches), "kernel": "(whole step)", "ms": round(step_ms, 3),
                     "launches_ms": round(total, 3), "outside_kernels_ms": round(step_ms - total, 3)})
        default = {i: row["tile"] for i, row in enumerate(rows[-len(launches) - 1:-1])}
        for tile in TILE_GRID if gpu else TILE_GRID[:1]:
            if time.time() > stop:
                sweep.append({"block": name, "tile": _tile_name(tile), "skipped": "budget"})
                continue
            try:
                with tile_override(tile):
                    step()  # compiles this tile's variants
                    traced = trace_launches(step)
                for i, (kernel, grid, args, meta) in enumerate(traced):
                    if kernel.__name__ in _GEMMS:
                        ms = _time_ms(lambda: kernel[grid](*args, **meta), gpu)
                        n = _launch_name(kernel, meta)
                        sweep.append({"layer": f"{name} #{i}", "kernel": f"{n['kernel']} {n['fused']}",
                                      "tile": n["tile"], "default": n["tile"] == default[i], "ms": round(ms, 3),
                                      "tflops": round(_gemm_flops(kernel, args, meta) / ms / 1e9, 1) if gpu else None})
            except Exception as e:  # a tile that does not compile (shared memory) is a finding
                sweep.append({"block": name, "tile": _tile_name(tile), "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return rows, sweep


def _launch_name(kernel, meta) -> dict:
    flags = [k for k, v in meta.items() if v is True]
    return {"kernel": kernel.__name__, "fused": "+".join(flags) or "-",
            "tile": _tile_name(_meta_tile(meta)) if "BM" in meta else ""}


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


def _gemm_flops(kernel, args, meta) -> int:
    """2 M N K of a conv GEMM launch (forward, dgrad and wgrad of one convolution are equal)."""
    v = dict(zip(kernel.arg_names, args), **meta)
    return 2 * math.prod(v[k] for k in ("Nb", "Do", "Ho", "Wo", "Cout", "Cin", "KD", "KH", "KW"))


def _ptx_rows() -> list[dict]:
    """Static facts of the block's four GEMM launches compiled for sm_90a (no GPU needed): each
    3^3 layer of the seed tower at the default tile, under both K loops (conv3d.K_LOOP), and
    layer1 under every tile of the sweep (forward and dgrad also under SWAP_TILES). What it shows: wgmma
    in use, operand tiles loaded by pipelined async copies (none by synchronous loads), registers,
    spills and shared memory per tile, the SASS main loop's instructions per iteration against its
    MMAs, and the share of the MMA rate its shared-memory traffic allows (smem_cap)."""
    from kernels.compile_report import conv_block_launches, report
    from kernels.conv3d import SWAP_TILES, TILE_GRID, is_swapped, tile_override

    rows = []
    for i, (name, cin, cout, sp, k, s, p) in enumerate(lay for lay in LAYERS if lay[4] == 3):
        for tile in [None] + (TILE_GRID + SWAP_TILES if i == 0 else []):
            swap = tile is not None and is_swapped(tile)
            for loop in ("flat", "tap") if tile is None or swap else ("flat",):
                with tile_override(tile, *(("fwd", "dgrad") if swap else ())) if tile else nullcontext():
                    launches = conv_block_launches(cin, cout, sp, 8, stride=s, k_loop=loop)
                for variant, launch in launches.items():
                    if swap and variant.startswith("wgrad"):
                        continue
                    r = report(*launch)
                    if launch[0].__name__ == "_conv_fwd":
                        r["l2_GB"] = round(fwd_l2_bytes(*launch) / 1e9, 2)
                    rows.append({"layer": name, "variant": variant, "k_loop": loop,
                                 "tile": _tile_name(tile or _meta_tile(r)), **r})
    rows += _ptx_inference_rows()
    return rows


def _ptx_inference_rows() -> list[dict]:
    """Layer1's inference forward (bias, residual, ReLU; BN folded) at the default tile and the
    512-voxel swapped one, tap loop, with and without ACT_L1: what the L1-allocating copies cost
    in registers and issue (nothing, if they are a free choice) and how many of the loop's copies
    take L1."""
    import torch

    from kernels.compile_report import capture, report
    from kernels.conv3d import SWAP_TILES, act_l1, conv3d_forward, k_loop, tile_override

    name, cin, cout, sp, k, s, p = LAYERS[2]
    x = torch.empty(8, cin, *sp, dtype=torch.bfloat16, device="meta").contiguous(memory_format=torch.channels_last_3d)
    w = torch.empty(cout, cin, k, k, k, dtype=torch.bfloat16, device="meta")
    b = torch.empty(cout, device="meta")
    rows = []
    for tile in (None, SWAP_TILES[-1]):
        for l1 in (False, True):
            with k_loop("tap"), act_l1(l1), tile_override(tile, "fwd") if tile else nullcontext():
                launch = capture(conv3d_forward, x, w, b, s, p, residual=x, relu=True)[0]
            r = report(*launch)
            rows.append({"layer": name, "variant": "inference fwd+bias+residual+relu" + (", activations through L1" if l1 else ""),
                         "k_loop": "tap", "tile": _tile_name(tile or _meta_tile(r)), **r,
                         "l2_GB": round(fwd_l2_bytes(*launch) / 1e9, 2)})
    return rows


def run(cfg, progress: bool = True, argv=None) -> dict:
    import torch

    from .loss import gpu_ceilings

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = getattr(torch, cfg.bench.conv_dtype) if gpu else torch.float32
    batch = cfg.bench.conv_batch if gpu else 2
    parts = list(cfg.bench.conv_parts)
    unknown = set(parts) - {"layers", "blocks", "tower", "tiles", "launches", "ptx"}
    if unknown:
        raise ValueError(f"bench.conv_parts: unknown {sorted(unknown)}; "
                         "choose from layers, blocks, tower, tiles, launches, ptx")
    if "ptx" in parts and os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("bench.conv_parts=[ptx] compiles for sm_90a and needs the kernels compiled, not interpreted: "
                         "run it without TRITON_INTERPRET=1")
    ceil = gpu_ceilings() if gpu else {}
    out = {"batch": batch, "dtype": str(dtype).split(".")[-1], "cudnn": torch.backends.cudnn.version(),
           "ceilings": ceil, "parts": parts}

    def show(r):
        if progress:
            print(r, flush=True)
        return r

    if "layers" in parts:
        out["rows"] = [show(_layer(*layer, batch=batch if gpu else 1, dtype=dtype, device=device, scale=1 if gpu else 8,
                                   ceil=ceil)) for layer in LAYERS]
        if gpu:
            out["layers_sum_excl_7_stem"] = {
                k: sum(r[k] for r in out["rows"] if not r["layer"].startswith("stem 7"))
                for k in ("triton_fwd_ms", "cudnn_fwd_ms", "triton_fwdbwd_ms", "cudnn_fwdbwd_ms")}
    if "blocks" in parts:
        out["blocks"] = [show(_block(*b, batch=batch, dtype=dtype, device=device, ceil=ceil)) for b in BLOCKS]
    if "tower" in parts:
        out["tower"] = [show(r) for r in _tower(batch, dtype, device, ceil, cfg.bench.conv_compile and gpu)]
    if "tiles" in parts:
        out["tiles"] = [show(r) for r in _tile_sweep(batch if gpu else 1, dtype, device, ceil, cfg.bench.conv_tile_budget_s)]
        out["best_tiles"] = best_tiles(out["tiles"])
    if "launches" in parts:
        out["launches"], out["launch_tiles"] = _launches(batch if gpu else 1, dtype, device, cfg.bench.conv_tile_budget_s)
        out["launch_best_tiles"] = best_tiles(out["launch_tiles"])
    if "ptx" in parts:
        out["ptx_target"] = "sm_90a (H100), bf16, batch 8 at the 96x192x192 crop; compiled here, static facts, no timing"
        out["ptx"] = [show(r) for r in _ptx_rows()]
    path = write_result(cfg.bench.results_dir, "conv", out, argv)
    if "rows" in out:
        cols = ["layer", "in", "cin", "cout", "rel_err_vs_torch"] + (
            ["triton_fwd_ms", "cudnn_fwd_ms", "triton_fwd_tflops", "cudnn_fwd_tflops", "triton_fwd_GBps",
             "triton_frac_of_roofline", "cudnn_frac_of_roofline", "l2_GB_fwd", "triton_fwd_l2_GBps",
             "triton_frac_of_l2_bound", "fwd_speedup_vs_cudnn",
             "triton_fwdbwd_ms", "cudnn_fwdbwd_ms", "fwdbwd_speedup_vs_cudnn", "cudnn_kernel"] if gpu else [])
        print(markdown_table(out["rows"], cols))
    if "blocks" in out:
        print(markdown_table(out["blocks"], ["block", "in", "cin", "cout", "rel_err_y", "rel_err_dx", "saved_MB_triton",
                                             "saved_MB_torch"] + (
            ["triton_fwdbwd_ms", "cudnn_fwdbwd_ms", "fwdbwd_speedup_vs_cudnn", "triton_tflops", "cudnn_tflops",
             "triton_frac_of_bf16_matmul"] if gpu else [])))
    if "tower" in out:
        print(markdown_table(out["tower"], ["tower", "impl", "in", "batch", "rel_err_y", "rel_err_dx", "rel_err_inference",
                                            "saved_MB_triton", "saved_MB_torch"]
                             + (["ms", "scans_per_s", "tflops", "frac_of_bf16_matmul", "speedup_vs_cudnn",
                                 "speedup_vs_cudnn_graph", "first_call_s"] if gpu else [])))
    if "tiles" in out:
        print(markdown_table(out["best_tiles"] if gpu else out["tiles"],
                             ["layer", "kernel", "best_tile", "ms", "tflops", "speedup_vs_cudnn", "gain_vs_default"] if gpu
                             else ["layer", "kernel", "tile", "rel_err_vs_cudnn", "error"]))
    if "launches" in out:
        print(markdown_table(out["launches"], ["block", "i", "kernel", "fused", "tile", "grid", "ms", "plain_ms",
                                               "fusion_cost", "tflops", "launches_ms", "outside_kernels_ms"]))
        print(markdown_table(out["launch_best_tiles"], ["layer", "kernel", "best_tile", "ms", "tflops", "default_ms",
                                                        "gain_vs_default"]))
    if "ptx" in out:
        print(markdown_table(out["ptx"], ["layer", "variant", "k_loop", "tile", "wgmma", "loop_async_loads",
                                          "loop_sync_tile_loads", "loop_sass_instructions", "loop_sass_mma", "registers",
                                          "spill_store_bytes", "shared_bytes", "smem_cap", "l2_GB", "loop_l1_copies"]))
    print(f"wrote {path}")
    return out
