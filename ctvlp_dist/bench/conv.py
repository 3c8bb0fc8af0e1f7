"""`ctvlp bench conv`: the Triton conv3d (model.conv_impl=triton) against cuDNN, in three parts
(bench.conv_parts):

- layers: each convolution of the seed model at its 96x192x192 crop (k2s2 stem: 48x96^2, 24x48^2,
  12x24^2, 6x12^2 at 64..512 channels) plus the standard 7^3 stride-2 stem, alone;
- blocks: each residual block in training mode (conv, BN, ReLU, shortcut), the fused Triton
  block (kernels/conv3d_block.py) against the torch block on cuDNN;
- tower: the whole ResNet3d18 (k2s2, BN), inference first, then a training step (forward +
  backward), against cuDNN eager and, with bench.conv_compile, torch.compile(mode="max-autotune";
  it replays CUDA graphs itself); inference also replayed as a CUDA graph (embedding extraction
  without per-launch CPU cost), still against cuDNN eager.

Batch bench.conv_batch, bf16 on GPU; CUDA events, median; the same run measures the bf16
matmul and copy ceilings, and each rate is reported against them. FLOPs are 2 M Cout K per GEMM
(forward; backward 2 more); a layer's bytes are the fewest possible (input, weight, output once
each). cuDNN runs in channels_last_3d; the profiler's top kernel name is recorded, so a silent
fallback (torch 2.9.0's bf16 conv3d) would show. CPU: the interpreter says nothing about speed,
so CPU runs only check that each part agrees with torch, at 1/8 of each spatial size (blocks
and tower also at 1/8 of the channels). The untimed kernel variants, the tile sweep, per-launch
timings and compile reports are tuning: kernels/tuning/bench_conv.py.
"""
from __future__ import annotations

import math

from ..records import markdown_table, write_result

# (name, Cin, Cout, input spatial at the 96x192x192 crop, kernel, stride, padding)
LAYERS = [("stem k2s2", 1, 64, (96, 192, 192), 2, 2, 0), ("stem 7^3 s2", 1, 64, (96, 192, 192), 7, 2, 3),
          ("layer1 3^3", 64, 64, (48, 96, 96), 3, 1, 1), ("layer2 3^3 s2", 64, 128, (48, 96, 96), 3, 2, 1),
          ("layer2 3^3", 128, 128, (24, 48, 48), 3, 1, 1), ("layer2 down 1^3 s2", 64, 128, (48, 96, 96), 1, 2, 0),
          ("layer3 3^3", 256, 256, (12, 24, 24), 3, 1, 1), ("layer4 3^3", 512, 512, (6, 12, 12), 3, 1, 1)]


def cuda_ms(fn, reps: int = 10) -> float:
    from .loss import cuda_time

    return cuda_time(fn, reps=reps, warmup=1) * 1e3


def top_kernel(fn) -> str:
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

    from kernels.conv3d import conv3d_triton

    sp = tuple(max(k, x // scale) for x in sp)
    x = torch.randn(batch, cin, *sp, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(cout, cin, k, k, k, device=device) / (cin * k ** 3) ** 0.5).to(dtype)
    y_ref = F.conv3d(x, w, None, s, p)
    y = conv3d_triton(x, w, None, s, p)
    err = float((y.float() - y_ref.float()).norm() / y_ref.float().norm())
    row = {"layer": name, "in": "x".join(map(str, sp)), "cin": cin, "cout": cout, "rel_err_vs_torch": round(err, 5)}
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

    t = {"triton_fwd_ms": cuda_ms(lambda: conv3d_triton(x, w, None, s, p)),
         "cudnn_fwd_ms": cuda_ms(lambda: F.conv3d(x, w, None, s, p)),
         "triton_fwdbwd_ms": cuda_ms(fb(conv3d_triton), reps=5), "cudnn_fwdbwd_ms": cuda_ms(fb(F.conv3d), reps=5)}
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
    row["fwd_speedup_vs_cudnn"] = round(t["cudnn_fwd_ms"] / t["triton_fwd_ms"], 3)
    row["fwdbwd_speedup_vs_cudnn"] = round(t["cudnn_fwdbwd_ms"] / t["triton_fwdbwd_ms"], 3)
    row["cudnn_kernel"] = top_kernel(lambda: F.conv3d(x, w, None, s, p))
    return row


# The residual blocks of the seed tower at the 96x192x192 crop: (name, Cin, Cout, stride, input spatial)
BLOCKS = [("layer1.0", 64, 64, 1, (48, 96, 96)), ("layer2.0", 64, 128, 2, (48, 96, 96)),
          ("layer2.1", 128, 128, 1, (24, 48, 48)), ("layer3.0", 128, 256, 2, (24, 48, 48)),
          ("layer3.1", 256, 256, 1, (12, 24, 24)), ("layer4.0", 256, 512, 2, (12, 24, 24)),
          ("layer4.1", 512, 512, 1, (6, 12, 12))]


def eighth(cin: int, cout: int, sp, floor: int = 2):
    """CPU (interpreter) size: 1/8 of the channels and of each spatial size."""
    return max(1, cin // 8), max(1, cout // 8), tuple(max(floor, v // 8) for v in sp)


def twins(make, device, dtype):
    """The same module twice, conv_impl torch and triton, with one state."""
    ref, tri = make("torch").to(device, dtype), make("triton").to(device, dtype)
    tri.load_state_dict(ref.state_dict())
    return ref.train(), tri.train()


def rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float(f"{float((a - b).norm() / b.norm().clamp_min(1e-30)):.3g}")


def agree(ref, tri, x) -> dict:
    """Output and input gradient of the triton module against the torch one, training mode."""
    import torch

    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    ys = [m(t) for m, t in zip((ref, tri), xs)]
    g = torch.randn_like(ys[0])
    for y in ys:
        y.backward(g)
    return {"rel_err_y": rel(ys[1], ys[0]), "rel_err_dx": rel(xs[1].grad, xs[0].grad)}


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


def train_step(m, x, g):
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
        cin, cout, sp = eighth(cin, cout, sp)
    ref, tri = twins(lambda impl: BasicBlock3d(cin, cout, stride, "bn", 1, impl), device, dtype)
    x = torch.randn(batch, cin, *sp, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    row = {"block": name, "in": "x".join(map(str, sp)), "cin": cin, "cout": cout, **agree(ref, tri, x)}
    xs = x.clone().requires_grad_()
    row.update(saved_MB_triton=saved_mb(tri, xs), saved_MB_torch=saved_mb(ref, xs))
    if not gpu:
        return row
    xg = x.clone().requires_grad_()
    g = torch.randn_like(ref(x))
    t = {"triton_fwdbwd_ms": cuda_ms(train_step(tri, xg, g), reps=5),
         "cudnn_fwdbwd_ms": cuda_ms(train_step(ref, xg, g), reps=5)}
    row.update({k: round(v, 3) for k, v in t.items()})
    row.update(peak_MB_triton=peak_mb(train_step(tri, xg, g)), peak_MB_torch=peak_mb(train_step(ref, xg, g)))
    row["fwdbwd_speedup_vs_cudnn"] = round(t["cudnn_fwdbwd_ms"] / t["triton_fwdbwd_ms"], 3)
    m_out = batch * math.prod(-(-v // stride) for v in sp)  # output positions of every conv in the block
    fl = 3 * 2 * m_out * cout * (27 * cin + 27 * cout + (cin if tri.down is not None else 0))
    row["triton_tflops"] = round(fl / t["triton_fwdbwd_ms"] / 1e9, 1)
    row["cudnn_tflops"] = round(fl / t["cudnn_fwdbwd_ms"] / 1e9, 1)
    row["triton_frac_of_bf16_matmul"] = round(row["triton_tflops"] / ceil["bf16_matmul_tflops"], 3)
    return row


def cuda_graph(fn):
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


def tower_rows(models: dict, ref, x, batch: int, crop, width: int, ceil: dict, base: dict, first: dict, gpu: bool,
               check=None, inference_only=()):
    """Rows of the whole tower, inference first (eval, no autograd: BN folded on the Triton side),
    then a training step (BN batch statistics, forward + backward of all parameters and the
    input), yielded as soon as each is measured, so that a device call cut short by its budget
    still logs the rows before the cut. `models`: name -> (module, context manager factory that
    the module runs under); `ref` is the cuDNN-eager module, the baseline. Each other row also
    records its agreement with the torch tower; `check(row, fn)` may add to it (the tuning bench
    counts the launches of its variant). `base` goes into every row, `first` into the first.
    Names in `inference_only` skip the training step."""
    import time
    from types import SimpleNamespace

    import torch

    from ..models.flops import image_tower_train_flops

    device, dtype = x.device, x.dtype
    train_fl = image_tower_train_flops(SimpleNamespace(stem="k2s2", norm="bn", gn_groups=32, width=width), crop) * batch
    xg = x.clone().requires_grad_()
    g = torch.randn(batch, ref.out_dim, device=device, dtype=dtype)
    # (mode, FLOPs, replayed as a CUDA graph, the cuDNN-eager mode it is compared with)
    modes = [("inference", train_fl / 3, False, "inference"), ("train fwd+bwd", train_fl, False, "train fwd+bwd")]
    if gpu:
        modes.insert(1, ("inference, CUDA graph", train_fl / 3, True, "inference"))
    cudnn_ms = {}
    for mode, fl, graph, base_mode in modes:
        for name, (m, ctx) in models.items():
            if graph and name.startswith("torch.compile"):
                continue  # max-autotune already replays CUDA graphs
            if mode == "train fwd+bwd" and name in inference_only:
                continue
            row = {"tower": mode, "impl": name, **base, **first}
            first = {}
            t0 = time.time()
            try:
                if mode == "train fwd+bwd":
                    m.train(), ref.train()
                    if m is not ref:
                        with ctx():
                            (check or (lambda r, f: f()))(row, lambda: row.update(agree(ref, m, x)))
                    step = train_step(m, xg, g)

                    def fn(step=step, ctx=ctx):
                        with ctx():
                            step()
                else:
                    m.eval(), ref.eval()

                    def fn(m=m, ctx=ctx):
                        with torch.no_grad(), ctx():
                            return m(x)
                    if m is not ref and not graph:
                        got = {}
                        (check or (lambda r, f: f()))(row, lambda: got.setdefault("y", fn()))
                        with torch.no_grad():
                            row["rel_err_inference"] = rel(got["y"], ref(x))
                    if graph:  # embedding extraction without per-launch CPU cost
                        fn = cuda_graph(fn)
                if gpu:
                    fn()  # the first calls (with the agreement's) compile, torch.compile autotunes: timed apart
                    torch.cuda.synchronize()
                    row["first_call_s"] = round(time.time() - t0, 1)
                    ms = cuda_ms(fn, reps=5)
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
    ref.train()
    for m, _ in models.values():
        m.train()


def tower_setup(batch: int, dtype, device, make_triton=None):
    """The seed tower twice (torch and Triton, one state) and its input: (ref, tri, x, batch,
    crop, width, base row). GPU: width 64 at 96x192x192; CPU: width 8 at 8x16x16 and 4 scans,
    so that layer4's BatchNorms see 4 values per channel (with 2, their input gradient is zero
    in exact arithmetic, and a comparison would be of rounding noise)."""
    import torch

    from ..models.resnet3d import ResNet3d18

    gpu = device == "cuda"
    width, crop = (64, (96, 192, 192)) if gpu else (8, (8, 16, 16))
    batch = batch if gpu else 4
    make = make_triton or (lambda: ResNet3d18("k2s2", "bn", 32, True, "triton", width))
    ref = ResNet3d18("k2s2", "bn", 32, True, "torch", width).to(device, dtype).train()
    tri = make().to(device, dtype).train()
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(batch, 1, *crop, device=device, dtype=dtype)
    xs = x.clone().requires_grad_()
    base = {"in": "x".join(map(str, crop)), "width": width, "batch": batch,
            "saved_MB_triton": saved_mb(tri, xs), "saved_MB_torch": saved_mb(ref, xs)}
    return ref, tri, x, batch, crop, width, base


def _tower(batch, dtype, device, ceil, compile_too: bool):
    """The production tower against cuDNN eager (and torch.compile max-autotune)."""
    import copy
    import time
    from contextlib import nullcontext

    import torch

    gpu = device == "cuda"
    ref, tri, x, batch, crop, width, base = tower_setup(batch, dtype, device)
    first = {}
    if gpu:
        first["cudnn_kernel"] = top_kernel(train_step(ref, x.clone().requires_grad_(),
                                                      torch.randn(batch, ref.out_dim, device=device, dtype=dtype)))
    models = {"cudnn eager": (ref, nullcontext), "triton fused": (tri, nullcontext)}
    if compile_too:
        t0 = time.time()
        try:
            models["torch.compile max-autotune"] = (torch.compile(copy.deepcopy(ref), mode="max-autotune"), nullcontext)
        except Exception as e:  # recorded, not fatal: the other rows still mean something
            first["compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        first["compile_wrap_s"] = round(time.time() - t0, 1)
    yield from tower_rows(models, ref, x, batch, crop, width, ceil, base, first, gpu)


TOWER_COLS = ["tower", "impl", "in", "batch", "rel_err_y", "rel_err_dx", "rel_err_inference", "saved_MB_triton",
              "saved_MB_torch"]
TOWER_GPU_COLS = ["ms", "scans_per_s", "tflops", "frac_of_bf16_matmul", "speedup_vs_cudnn", "speedup_vs_cudnn_graph",
                  "first_call_s"]


def run(cfg, progress: bool = True, argv=None) -> dict:
    import torch

    from .loss import gpu_ceilings

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = getattr(torch, cfg.bench.conv_dtype) if gpu else torch.float32
    batch = cfg.bench.conv_batch if gpu else 2
    parts = list(cfg.bench.conv_parts)
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
    path = write_result(cfg.bench.results_dir, "conv", out, argv)
    if "rows" in out:
        cols = ["layer", "in", "cin", "cout", "rel_err_vs_torch"] + (
            ["triton_fwd_ms", "cudnn_fwd_ms", "triton_fwd_tflops", "cudnn_fwd_tflops", "triton_fwd_GBps",
             "triton_frac_of_roofline", "cudnn_frac_of_roofline", "fwd_speedup_vs_cudnn",
             "triton_fwdbwd_ms", "cudnn_fwdbwd_ms", "fwdbwd_speedup_vs_cudnn", "cudnn_kernel"] if gpu else [])
        print(markdown_table(out["rows"], cols))
    if "blocks" in out:
        print(markdown_table(out["blocks"], ["block", "in", "cin", "cout", "rel_err_y", "rel_err_dx", "saved_MB_triton",
                                             "saved_MB_torch"] + (
            ["triton_fwdbwd_ms", "cudnn_fwdbwd_ms", "fwdbwd_speedup_vs_cudnn", "triton_tflops", "cudnn_tflops",
             "triton_frac_of_bf16_matmul"] if gpu else [])))
    if "tower" in out:
        print(markdown_table(out["tower"], TOWER_COLS + (TOWER_GPU_COLS if gpu else [])))
    print(f"wrote {path}")
    return out
