"""`ctvlp bench conv`: the Triton implicit-GEMM conv3d against cuDNN, per layer of the tower.

Layers of the seed model at its 96x192x192 crop (k2s2 stem: 48x96^2, 24x48^2, 12x24^2, 6x12^2 at
64..512 channels) plus the standard 7^3 stride-2 stem, batch bench.conv_batch, bf16 on GPU.
Forward and forward + backward (input and weight gradients), CUDA events, median. FLOPs are
2 M Cout K for each GEMM (forward; backward 2 more), bytes the fewest possible (input, weight,
output once each). cuDNN runs in channels_last_3d; the profiler's top kernel name is recorded,
so a silent fallback (torch 2.9.0's bf16 conv3d) would show. CPU: the same layers at 1/8 of
each spatial size through the interpreter would say nothing about speed, so CPU runs only check
that every layer agrees with torch.
"""
from __future__ import annotations

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


def _layer(name, cin, cout, sp, k, s, p, batch, dtype, device, scale=1):
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

    t = {"triton_fwd_ms": _cuda_ms(lambda: conv3d_triton(x, w, None, s, p)),
         "cudnn_fwd_ms": _cuda_ms(lambda: F.conv3d(x, w, None, s, p)),
         "triton_fwdbwd_ms": _cuda_ms(fb(conv3d_triton), reps=5), "cudnn_fwdbwd_ms": _cuda_ms(fb(F.conv3d), reps=5)}
    row.update({k: round(v, 3) for k, v in t.items()})
    row["gflop_fwd"] = round(fl / 1e9, 1)
    row["triton_fwd_tflops"] = round(fl / t["triton_fwd_ms"] / 1e9, 1)
    row["cudnn_fwd_tflops"] = round(fl / t["cudnn_fwd_ms"] / 1e9, 1)
    row["min_MB"] = round(bytes_min / 2 ** 20, 1)
    row["fwd_speedup_vs_cudnn"] = round(t["cudnn_fwd_ms"] / t["triton_fwd_ms"], 3)
    row["fwdbwd_speedup_vs_cudnn"] = round(t["cudnn_fwdbwd_ms"] / t["triton_fwdbwd_ms"], 3)
    row["cudnn_kernel"] = _top_kernel(lambda: F.conv3d(x, w, None, s, p))
    return row


def run(cfg, progress: bool = True, argv=None) -> dict:
    import torch

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = getattr(torch, cfg.bench.conv_dtype) if gpu else torch.float32
    batch = cfg.bench.conv_batch if gpu else 1
    rows = []
    for layer in LAYERS:
        r = _layer(*layer, batch=batch, dtype=dtype, device=device, scale=1 if gpu else 8)
        rows.append(r)
        if progress:
            print(r, flush=True)
    out = {"batch": batch, "dtype": str(dtype).split(".")[-1], "cudnn": torch.backends.cudnn.version(), "rows": rows}
    if gpu:
        tot = {k: sum(r[k] for r in rows if not r["layer"].startswith("stem 7")) for k in
               ("triton_fwd_ms", "cudnn_fwd_ms", "triton_fwdbwd_ms", "cudnn_fwdbwd_ms")}
        out["layers_sum_excl_7_stem"] = tot
    path = write_result(cfg.bench.results_dir, "conv", out, argv)
    cols = ["layer", "in", "cin", "cout", "rel_err_vs_torch"] + (
        ["triton_fwd_ms", "cudnn_fwd_ms", "triton_fwd_tflops", "cudnn_fwd_tflops", "fwd_speedup_vs_cudnn",
         "triton_fwdbwd_ms", "cudnn_fwdbwd_ms", "fwdbwd_speedup_vs_cudnn", "cudnn_kernel"] if gpu else [])
    print(markdown_table(rows, cols))
    print(f"wrote {path}")
    return out
