"""Tuning benchmarks of the contrastive loss's kernels.

    env -u TRITON_INTERPRET python -m kernels.tuning.bench_loss OUT            # compile reports
    python -m kernels.tuning.bench_loss OUT --compare 1024,16384 --fwd F [--panel G;M] [--inputs mixed]

- compile reports for an H100 (sm_90a), on any machine without a GPU (Triton's wheel carries
  ptxas): registers, spills, shared memory, operand loads (async copies or TMA) and the SASS
  main loop of the forward, the two-pass backward and the panel's G tile, each tile with and
  without TMA loads, at b = 65,536, d = 512, bf16 (record loss-ptx-*.json). Static facts, not
  speed: the GPU sweep (benchmarks/loss_gpu.py) times the same tiles.
- --compare: forward + backward of dense torch, production's kernels and a variant (forward
  tiles `--fwd`, the two-pass backward with `--bwd` or the panel backward with `--panel`) in one
  process, each with its agreement with production (record loss-variants-*.json).
"""
from __future__ import annotations

import argparse
import os
import sys

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


def ptx_rows(d: int = 512, b: int = 65536) -> list[dict]:
    from .compile_report import loss_backward_launches, loss_forward_launches, loss_panel_launches, report
    from .panel import PanelConfig

    rows = [{"kernel_role": "forward", "tiles": t, **report(*loss_forward_launches(b, d, t)["forward"])}
            for t in PTX_FWD]
    for t in PTX_BWD:
        rows += [{"kernel_role": f"backward {name}", "tiles": t, **report(*launch)}
                 for name, launch in loss_backward_launches(b, d, t).items()]
    for t in PTX_GRAD:
        launch = loss_panel_launches(b, d, PanelConfig(t, "128,128,64,8,3"))["G tile"]
        rows.append({"kernel_role": "panel G tile", "tiles": t, **report(*launch)})
    return rows


def timed(fn) -> float:
    """Seconds of one call: CUDA events (median of 5, after a warm-up) on a GPU, one wall-clock
    run on CPU (the interpreter under --dry: plumbing only, no speed)."""
    import torch

    if torch.cuda.is_available():
        from ctvlp_dist.bench.loss import cuda_time

        return cuda_time(fn, reps=5, warmup=1)
    import time

    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(sizes, fwd: str, bwd=None, panel=None, inputs: str = "random", d: int = 512) -> list[dict]:
    """Rows per b: ms and the 8 b^2 d rate of dense, production and the variant, and the
    variant's speed-up over production and its largest relative difference from it."""
    import torch

    from ctvlp_dist.bench.loss import loss_inputs
    from kernels.contrastive import blockwise_clip_loss, reference_clip_loss

    from .loss_variants import variant_clip_loss
    from .panel import PanelConfig

    gpu = torch.cuda.is_available()
    dev, dt = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    cfg = PanelConfig.parse(panel) if panel else None
    methods = {"dense": lambda I, T, s: reference_clip_loss(I, T, s),
               "triton": lambda I, T, s: blockwise_clip_loss(I, T, s, impl="triton"),
               "variant": lambda I, T, s: variant_clip_loss(I, T, s, fwd=fwd, bwd=bwd, backward="panel" if panel else
                                                            "two_pass", panel=cfg)}
    rows = []
    for b in sizes:
        I, T, s = loss_inputs(b, d, dt, dev, kind=inputs)
        grads = {}
        for name, fn in methods.items():
            if name == "dense" and b > 65536:
                continue

            def step():
                I.grad = T.grad = s.grad = None
                fn(I, T, s).backward()
            row = {"b": b, "method": name, "fwd": fwd if name == "variant" else None,
                   "backward": ("panel " + panel if panel else f"two_pass {bwd}") if name == "variant" else None}
            try:
                ms = timed(step) * 1e3
                grads[name] = (I.grad.float().clone(), T.grad.float().clone())
                row.update(ms=round(ms, 3), tflops_8b2d=round(8 * b * b * d / ms / 1e9, 1))
            except Exception as e:  # a variant that fails is a finding, not the end of the run
                row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            rows.append(row)
            print(row, flush=True)
        base = next((r for r in rows if r["b"] == b and r["method"] == "triton" and "ms" in r), None)
        var = next((r for r in rows if r["b"] == b and r["method"] == "variant" and "ms" in r), None)
        if base and var:
            var["speedup_vs_triton"] = round(base["ms"] / var["ms"], 3)
            var["max_rel_diff_vs_triton"] = max(float((a - c).norm() / c.norm()) for a, c in zip(grads["variant"],
                                                                                                grads["triton"]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.tuning.bench_loss", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for the record (copy it to benchmarks/results/)")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--compare", help="batch sizes b, comma-separated: time dense, production and the variant")
    ap.add_argument("--fwd", default="64,128,64,128,4,3", help="--compare: the variant's forward tiles")
    ap.add_argument("--bwd", default="64,64,64,512,8,2,1", help="--compare: its two-pass backward tiles")
    ap.add_argument("--panel", help="--compare: the panel backward instead, 'G tile;GEMM tile' (PanelConfig.parse)")
    ap.add_argument("--inputs", default="random", choices=["random", "mixed"])
    args = ap.parse_args(argv)
    from ctvlp_dist.records import markdown_table, write_result

    if args.compare:
        rows = compare([int(b) for b in args.compare.split(",")], args.fwd, args.bwd, args.panel, args.inputs, args.d)
        path = write_result(args.out, "loss-variants", {"d": args.d, "inputs": args.inputs, "rows": rows}, sys.argv)
        print(markdown_table(rows, ["b", "method", "fwd", "backward", "ms", "tflops_8b2d", "speedup_vs_triton",
                                    "max_rel_diff_vs_triton", "error"]))
        print(f"wrote {path}")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("this compiles for sm_90a and needs the kernels compiled, not interpreted: run it without "
                 "TRITON_INTERPRET=1")
    rows = ptx_rows(args.d)
    path = write_result(args.out, "loss-ptx", {"ptx_target": f"sm_90a (H100), bf16, b = 65,536, d = {args.d}; "
                                               "compiled here, static facts, no timing", "ptx": rows}, sys.argv)
    print(markdown_table(rows, ["kernel_role", "tiles", "registers", "spill_store_bytes", "shared_bytes",
                                "loop_async_loads", "loop_tma_loads", "dot_loop_depth", "loop_sass_instructions",
                                "loop_sass_mma", "smem_cap"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
