"""`ctvlp bench loss`: forward+backward time and peak extra memory of the contrastive loss.

Methods: dense torch (b x b logits, autograd), the chunked torch path, the Triton kernels (GPU
only; tiles from the config's `kernels:` section, else their measured rule). Inputs
(bench.loss_inputs): "random" unit vectors at scale 1/0.07, as at initialisation; "mixed" pairs
whose cosine is spread over [0, 0.9] at scale 100, as in a trained batch with sure and unsure
pairs side by side. FLOPs counted as 8 b^2 d (forward S, backward: recompute S once, dI and
dT); our backward recomputes S once per direction, so the kernels execute 10 b^2 d: the table
reports rates on the 8 b^2 d count, against a bf16 matmul measured in the same run.
Memory is the peak allocated beyond the inputs (GPU: torch.cuda.max_memory_allocated; CPU:
peak RSS of a fresh subprocess per measurement, minus the same process's RSS before the loss).
The untimed kernel variants and their compile reports are tuning: kernels/tuning/bench_loss.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

from ..records import markdown_table, write_result


def loss_inputs(b, d, dtype, device, seed=0, kind="random"):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    I = torch.randn(b, d, device=device, dtype=torch.float32, generator=g)
    T = torch.randn(b, d, device=device, dtype=torch.float32, generator=g)
    I, T = I / I.norm(dim=1, keepdim=True), T / T.norm(dim=1, keepdim=True)
    scale = 1 / 0.07
    if kind == "mixed":  # cos(I_i, T_i) = c_i, uniform in [0, 0.9]
        c = 0.9 * torch.rand(b, 1, device=device, generator=g)
        T = T - (T * I).sum(1, keepdim=True) * I
        T = c * I + (1 - c ** 2).sqrt() * T / T.norm(dim=1, keepdim=True)
        scale = 100.0
    elif kind != "random":
        raise ValueError(f"bench.loss_inputs must be random or mixed, got {kind!r}")
    s = torch.tensor(scale, device=device, requires_grad=True)
    return I.to(dtype).requires_grad_(), T.to(dtype).requires_grad_(), s


def _step(method, I, T, s, tiles=None):
    from kernels.contrastive import blockwise_clip_loss, reference_clip_loss

    if method == "dense":
        loss = reference_clip_loss(I, T, s)
    elif method == "chunked":
        loss = blockwise_clip_loss(I, T, s, impl="torch")
    elif method == "triton":
        loss = blockwise_clip_loss(I, T, s, impl="triton", **(tiles or {}))
    else:
        raise ValueError(f"bench.loss_methods: unknown method {method!r}")
    loss.backward()
    return loss


def gpu_ceilings() -> dict:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, reps=10)
    x = torch.empty(2 ** 30 // 2, device="cuda", dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    tc = cuda_time(lambda: y.copy_(x), reps=10)
    return {"bf16_matmul_tflops": round(2 * 8192 ** 3 / t / 1e12, 1), "copy_GBps": round(2 * x.numel() * 2 / tc / 1e9, 1)}


def cuda_time(fn, reps=5, warmup=2) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def _measure_gpu(method, b, d, dtype, kind, tiles) -> dict:
    import torch

    I, T, s = loss_inputs(b, d, dtype, "cuda", kind=kind)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()

    def run():
        I.grad = T.grad = s.grad = None
        _step(method, I, T, s, tiles)

    reps = 1 if b >= 262144 else (3 if b >= 65536 else 10)
    try:
        t = cuda_time(run, reps=reps, warmup=0 if b > 500_000 else 1)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"method": method, "b": b, "status": "out of memory"}
    peak = torch.cuda.max_memory_allocated() - base
    return {"method": method, "b": b, "status": "ok", "ms": round(t * 1e3, 3), "peak_extra_MB": round(peak / 2 ** 20, 1)}


def cpu_child(method, b, d, kind="random") -> None:
    """Runs in a fresh process: prints time and peak extra RSS of one forward+backward."""
    import resource

    import torch

    torch.set_num_threads(2)
    I, T, s = loss_inputs(b, d, torch.float32, "cpu", kind=kind)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    _step(method, I, T, s)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"ms": round(dt * 1e3, 1), "peak_extra_MB": round((peak - before) / 1024, 1)}))


def _measure_cpu(method, b, d, kind) -> dict:
    r = subprocess.run([sys.executable, "-c",
                        f"from ctvlp_dist.bench.loss import cpu_child; cpu_child({method!r}, {b}, {d}, {kind!r})"],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return {"method": method, "b": b, "status": "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return {"method": method, "b": b, "status": "ok", **json.loads(r.stdout.strip().splitlines()[-1])}


def run(cfg, progress: bool = True, argv=None) -> dict:
    import torch

    bc = cfg.bench
    gpu = torch.cuda.is_available()
    d = bc.loss_dim
    tiles = dict(fwd_tiles=cfg.kernels.clip_fwd_tiles, bwd_tiles=cfg.kernels.clip_bwd_tiles)
    dtype = getattr(torch, bc.loss_dtype) if gpu else torch.float32
    ceil = gpu_ceilings() if gpu and bc.loss_sizes else {}
    rows = []
    for b in bc.loss_sizes:
        for m in bc.loss_methods:
            if m.startswith("triton") and not gpu:
                continue
            kind = bc.loss_inputs
            r = _measure_gpu(m, b, d, dtype, kind, tiles) if gpu else _measure_cpu(m, b, d, kind)
            if r["status"] == "ok":
                flops = 8 * b * b * d
                r["tflops_8b2d"] = round(flops / (r["ms"] / 1e3) / 1e12, 2)
                if ceil:
                    r["frac_of_bf16_matmul"] = round(r["tflops_8b2d"] / ceil["bf16_matmul_tflops"], 3)
            rows.append(r)
            if progress:
                print(json.dumps(r), flush=True)
    dense = {r["b"]: r for r in rows if r["method"] == "dense" and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok" and r["b"] in dense and r["method"] != "dense":
            r["speedup_vs_dense"] = round(dense[r["b"]]["ms"] / r["ms"], 3)
            r["memory_vs_dense"] = round(r["peak_extra_MB"] / max(dense[r["b"]]["peak_extra_MB"], 1e-9), 4)
    payload = {"d": d, "dtype": str(dtype).replace("torch.", ""), "inputs": bc.loss_inputs, "flops_counted": "8*b^2*d",
               "kernel_tiles": {k: v for k, v in tiles.items() if v is not None}, "ceilings": ceil, "rows": rows}
    path = write_result(bc.results_dir, "loss", payload, argv)
    cols = ["method", "b", "status", "ms", "peak_extra_MB", "tflops_8b2d", "frac_of_bf16_matmul", "speedup_vs_dense",
            "memory_vs_dense"]
    if rows:
        print(markdown_table(rows, cols))
    if ceil:
        print(f"ceilings measured in this run: {ceil}")
    print(f"wrote {path}")
    return payload
