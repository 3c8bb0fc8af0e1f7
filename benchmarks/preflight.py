"""Compile, for an H100 (sm_90a) and without a GPU, every Triton kernel launch the next device
calls will make, so that none of their scarce minutes is lost to a kernel that does not compile.

    python3 benchmarks/preflight.py [--list] [--limit N] [--only loss|tower]
    make preflight        # the same under the GPU image's Triton (GPU_TRITON in the Makefile)

Launches are captured, not run (kernels/tuning/compile_report.py): the loss's sweep tiles,
backward tiles and panel configurations (loss_configs.py), production's forward, finalize and
backward at b = 65,536, d = 512, bf16 (and the CUDA tests' fp16 and fp32 inputs); and the
ResNet3d18 tower's launches (forward, dgrad, wgrad, BN passes) under production's kernels and
each variant that conv_gpu.py times, inference and training, on a small volume, in bf16 with
both stems and in fp16 and fp32. Each distinct
launch is compiled once, and fails the check where it would not launch (more shared memory
than a block may have). Why it exists: the GPU image runs an older Triton than this machine, and
on 2026-11-24 a string constexpr default that 3.7.1 accepts failed to compile under 3.6.0 in
every panel kernel. Exit status 1 when any launch fails.
"""
import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMEM_PER_BLOCK = 227 * 1024  # H100: the most shared memory one block may take (opt-in)
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]


def loss_launches():
    """(name, launch) for every loss kernel launch of loss_gpu.py's phases."""
    import torch

    from kernels import contrastive_triton as ct
    from kernels.tuning import compile_report as cr
    from kernels.tuning.panel import PanelConfig
    from loss_configs import BWD, FWD, PANEL

    b, d = 65536, 512
    x = torch.empty(b, d, dtype=torch.bfloat16, device="meta")
    g = torch.empty(b, dtype=torch.int32, device="meta")
    v, s = torch.empty(b, device="meta"), torch.empty(1, device="meta")
    for t in FWD:
        yield f"loss forward {t}", cr.loss_forward_launches(b, d, t)["forward"]
    for t in BWD + ["64,64,64,128,8,3"]:  # and the d-chunked tile of the pytest phase
        for name, launch in cr.loss_backward_launches(b, d, t).items():
            yield f"loss backward {t} {name}", launch
    for p in PANEL:
        for name, launch in cr.loss_panel_launches(b, d, PanelConfig.parse(p)).items():
            yield f"loss panel {p} {name}", launch
    # production's own launches (its rule's tiles): forward + finalize, the two backward passes
    for launch in cr.capture(ct.triton_forward_loss, x, x, s, g, g, v, True):
        yield f"loss production forward+finalize {launch[0].__name__}", launch
    for launch in cr.capture(ct.triton_backward, x, x, s, g, g, v, v, v, 1.0, True):
        yield f"loss production backward {launch[0].__name__}", launch
    # the CUDA tests' other inputs (fp16, fp32 through tf32; widths not a power of two)
    for dtype in (torch.float16, torch.float32):
        for dd in (40, 300):
            for name, launch in [*cr.loss_forward_launches(1000, dd, "128,128,64,128,8,3", dtype).items(),
                                 *cr.loss_backward_launches(1000, dd, "64,64,64,512,8,2,1", dtype).items(),
                                 *cr.loss_panel_launches(1000, dd, None, dtype).items()]:
                yield f"loss {str(dtype)[6:]} d={dd} {name}", launch


def tower_launches():
    """(name, launch) for the tower's launches under production and each conv_gpu.py variant,
    inference (eval, BN folded) and a training step, one per distinct (kernel, constexprs,
    argument types): in bf16 with the k2s2 and the 7^3 stem, and in fp16 and fp32 (the CUDA tests'
    other dtypes)."""
    from contextlib import nullcontext

    import torch

    from ctvlp_dist.models.resnet3d import ResNet3d18
    from kernels.tuning.bench_conv import TOWER_VARIANTS
    from kernels.tuning.compile_report import capturing

    variants = {"production": None, **TOWER_VARIANTS}
    seen = set()
    for dtype, stem in ((torch.bfloat16, "k2s2"), (torch.bfloat16, "standard"), (torch.float16, "k2s2"),
                        (torch.float32, "k2s2")):
        x = torch.randn(2, 1, 16, 32, 32, dtype=dtype)
        for vname, v in variants.items():
            m = ResNet3d18(stem, "bn", 32, True, "triton", 64, v.rule if v else None).to(dtype)
            for mode in ("inference", "train"):
                with v.active() if v else nullcontext(), capturing() as launches:  # recorded, not run
                    if mode == "inference":
                        with torch.no_grad():
                            m.eval()(x)
                    else:
                        m.train()(x.clone().requires_grad_()).float().sum().backward()
                for kernel, grid, args, meta in launches:
                    key = (kernel.__name__, json.dumps({k: str(v) for k, v in sorted(meta.items())}),
                           tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args))
                    if key not in seen:
                        seen.add(key)
                        yield (f"tower [{str(dtype)[6:]}, {stem} stem] {vname} {mode} {kernel.__name__}",
                               (kernel, grid, args, meta))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="name the launches, compile none")
    ap.add_argument("--limit", type=int, default=0, help="compile only the first N launches of each group")
    ap.add_argument("--only", choices=["loss", "tower"], default=None)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("preflight compiles the kernels: run it without TRITON_INTERPRET=1")
    import triton

    from kernels.tuning.compile_report import report

    print(f"Triton {triton.__version__}, target sm_90a", flush=True)
    failed, n = [], 0
    for group, gen in (("loss", loss_launches), ("tower", tower_launches)):
        if args.only and group != args.only:
            continue
        for i, (name, launch) in enumerate(gen()):
            if args.limit and i >= args.limit:
                break
            n += 1
            if args.list:
                print(name, flush=True)
                continue
            try:
                r = report(*launch)
            except Exception as e:  # the compiler's last line says why
                failed.append(name)
                print(f"FAIL {name}: {[x for x in str(e).splitlines() if x.strip()][-1][:200]}", flush=True)
                continue
            facts = f"{r['registers']} registers, {r['spill_store_bytes']} B spilled, {r['shared_bytes']} B shared"
            if r["shared_bytes"] > SMEM_PER_BLOCK:  # compiles, then fails at launch: out of resources
                failed.append(name)
                print(f"FAIL {name}: {facts}, over the {SMEM_PER_BLOCK} B a block may have", flush=True)
            else:
                print(f"ok   {name}: {facts}", flush=True)
    print(f"{n} launches{'' if args.list else f', {len(failed)} failed'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
