"""`ctvlp bench loss`: forward+backward time and peak extra memory of the contrastive loss.

Methods: dense torch (b x b logits, autograd), the chunked torch path, the Triton kernels
(GPU only; "triton-panel", "triton-two_pass", "triton-fused" name a backward variant, so that
they compare in one run). Inputs (bench.loss_inputs): "random" unit vectors at scale 1/0.07, as
at initialisation; "mixed" pairs whose cosine is spread over [0, 0.9] at scale 100, as in a
trained batch with sure and unsure pairs side by side (the one-exponential softmax's hard
case: tiles whose lse spread exceeds its guard take two exponentials). FLOPs counted as 8 b^2 d (forward S, backward: recompute S once, dI and dT);
our backward recomputes S once per direction, so the kernels execute 10 b^2 d: the table
reports rates on the 8 b^2 d count, against a bf16 matmul measured in the same run.
Memory is the peak allocated beyond the inputs (GPU: torch.cuda.max_memory_allocated; CPU:
peak RSS of a fresh subprocess per measurement, minus the same process's RSS before the loss).
`bench.loss_ptx=true` adds what the compiler makes of the kernels for an H100 (sm_90a, bf16,
b = 65,536), on any machine: registers, spills, shared memory, operand loads (async copies or
TMA) and the SASS main loop, for forward, backward and G tiles each with and without TMA loads.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from unittest import mock

from .record import markdown_table, write_result


def _inputs(b, d, dtype, device, seed=0, kind="random"):
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


def _step(method, I, T, s):
    from kernels.contrastive import blockwise_clip_loss, reference_clip_loss

    if method == "dense":
        loss = reference_clip_loss(I, T, s)
    elif method == "chunked":
        loss = blockwise_clip_loss(I, T, s, impl="torch")
    else:  # triton or triton-<backward variant>
        loss = blockwise_clip_loss(I, T, s, impl="triton", backward=method.partition("-")[2] or None)
    loss.backward()
    return loss


def gpu_ceilings() -> dict:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = _cuda_time(lambda: a @ b, reps=10)
    x = torch.empty(2 ** 30 // 2, device="cuda", dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    tc = _cuda_time(lambda: y.copy_(x), reps=10)
    out = {"bf16_matmul_tflops": round(2 * 8192 ** 3 / t / 1e12, 1), "copy_GBps": round(2 * x.numel() * 2 / tc / 1e9, 1)}
    a = b = x = y = None  # free 1.5 GB before the probe
    try:  # the rate our tiles' operand re-reads are bound by (kernels/l2_probe.py); not fatal if it fails
        from kernels.l2_probe import l2_read_GBps

        out["l2_read_GBps"] = round(l2_read_GBps(), 1)
    except Exception as e:
        out["l2_read_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    return out


def _cuda_time(fn, reps=5, warmup=2) -> float:
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


def _measure_gpu(method, b, d, dtype, kind) -> dict:
    import torch

    I, T, s = _inputs(b, d, dtype, "cuda", kind=kind)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()

    def run():
        I.grad = T.grad = s.grad = None
        _step(method, I, T, s)

    reps = 1 if b >= 262144 else (3 if b >= 65536 else 10)
    try:
        t = _cuda_time(run, reps=reps, warmup=0 if b > 500_000 else 1)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"method": method, "b": b, "status": "out of memory"}
    peak = torch.cuda.max_memory_allocated() - base
    return {"method": method, "b": b, "status": "ok", "ms": round(t * 1e3, 3), "peak_extra_MB": round(peak / 2 ** 20, 1)}


def _cpu_child(method, b, d, kind="random") -> None:
    """Runs in a fresh process: prints time and peak extra RSS of one forward+backward."""
    import resource

    import torch

    torch.set_num_threads(2)
    I, T, s = _inputs(b, d, torch.float32, "cpu", kind=kind)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    _step(method, I, T, s)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"ms": round(dt * 1e3, 1), "peak_extra_MB": round((peak - before) / 1024, 1)}))


def _measure_cpu(method, b, d, kind) -> dict:
    r = subprocess.run([sys.executable, "-c",
                        f"from ctvlp_dist.bench.loss import _cpu_child; _cpu_child({method!r}, {b}, {d}, {kind!r})"],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return {"method": method, "b": b, "status": "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return {"method": method, "b": b, "status": "ok", **json.loads(r.stdout.strip().splitlines()[-1])}


# (forward and two-pass backward tiles "BM,BN,BK,BD,warps,stages,flag[,maxnreg]", panel G tiles
# "BM,BN,BK,warps,stages,tma"): each pair differs only in the TMA bit, so a record shows what
# tensor-descriptor loads change; the last three cap the registers (two 8-warp programs per SM)
PTX_FWD = ["64,128,64,128,4,3,0", "64,128,64,128,4,3,4", "128,128,64,128,8,3,0", "128,128,64,128,8,3,4",
           "64,128,64,128,8,3,2", "64,128,64,128,8,3,6", "64,64,64,128,4,3,2", "64,64,64,128,4,3,6",
           "128,64,64,128,4,3,3", "128,64,64,128,4,3,7", "64,128,64,128,8,3,2,128", "64,128,64,128,8,3,6,128",
           "64,128,64,128,4,3,0,168"]
PTX_BWD = ["64,64,64,512,8,2,1", "64,64,64,512,8,2,5"]
PTX_GRAD = ["128,64,64,8,3,0", "128,64,64,8,3,1", "128,128,64,8,3,0", "128,128,64,8,3,1", "64,128,64,4,3,0",
            "64,128,64,4,3,1"]


def _ptx_rows(d: int) -> list[dict]:
    """Static facts of the forward, the two-pass backward and the panel's G tile compiled for
    sm_90a at b = 65,536."""
    from kernels.compile_report import loss_backward_launches, loss_forward_launches, loss_panel_launches, report

    rows = [{"kernel_role": "forward", "tiles": t, **report(*loss_forward_launches(65536, d, t)["forward"])}
            for t in PTX_FWD]
    with mock.patch.dict(os.environ):  # the launch helpers read their tiles from the environment
        for t in PTX_BWD:
            os.environ["CTVLP_CLIP_BWD_TILES"] = t
            rows += [{"kernel_role": f"backward {name}", "tiles": t, **report(*launch)}
                     for name, launch in loss_backward_launches(65536, d).items()]
        for t in PTX_GRAD:
            os.environ["CTVLP_CLIP_PANEL_TILES"] = f"{t};128,128,64,8,3"
            rows.append({"kernel_role": "panel G tile", "tiles": t, **report(*loss_panel_launches(65536, d)["G tile"])})
    return rows


def run(cfg, progress: bool = True, argv=None) -> dict:
    import torch

    bc = cfg.bench
    gpu = torch.cuda.is_available()
    d = bc.loss_dim
    if bc.loss_ptx and os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("bench.loss_ptx=true compiles for sm_90a and needs the kernels compiled, not interpreted: "
                         "run it without TRITON_INTERPRET=1")
    dtype = getattr(torch, bc.loss_dtype) if gpu else torch.float32
    ceil = gpu_ceilings() if gpu and bc.loss_sizes else {}
    rows = []
    for b in bc.loss_sizes:
        for m in bc.loss_methods:
            if m.startswith("triton") and not gpu:
                continue
            kind = bc.loss_inputs
            r = _measure_gpu(m, b, d, dtype, kind) if gpu else _measure_cpu(m, b, d, kind)
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
               "kernel_env": {k: v for k, v in os.environ.items() if k.startswith("CTVLP_CLIP_")}, "ceilings": ceil,
               "rows": rows}
    if bc.loss_ptx:
        payload["ptx_target"] = f"sm_90a (H100), bf16, b = 65,536, d = {d}; compiled here, static facts, no timing"
        payload["ptx"] = _ptx_rows(d)
    path = write_result(bc.results_dir, "loss", payload, argv)
    cols = ["method", "b", "status", "ms", "peak_extra_MB", "tflops_8b2d", "frac_of_bf16_matmul", "speedup_vs_dense",
            "memory_vs_dense"]
    if rows:
        print(markdown_table(rows, cols))
    if ceil:
        print(f"ceilings measured in this run: {ceil}")
    if bc.loss_ptx:
        print(markdown_table(payload["ptx"], ["kernel_role", "tiles", "registers", "spill_store_bytes", "shared_bytes",
                                              "loop_async_loads", "loop_tma_loads", "dot_loop_depth",
                                              "loop_sass_instructions", "loop_sass_mma", "smem_cap"]))
    print(f"wrote {path}")
    return payload
