"""One device call for the contrastive-loss kernels: correctness, tile sweep, benchmark.

    python3 benchmarks/loss_gpu.py OUTDIR [--phases pytest,sweep,bench,fused,big] [--tiles FWD --bwd-tiles BWD]

Phases, each under a share of one wall-clock budget (gpu_call.py):
- pytest: the CUDA tests in kernels/test_contrastive.py (bf16/fp16/fp32 vs fp64), fixed tiles;
- sweep: forward and backward tile configs, each pass alone, at b=16384, d=512, bf16;
- bench: `ctvlp bench loss` with the best tiles: dense, chunked and Triton, b = 1k..64k;
- fused: the atomics backward at b = 16k and 64k (Triton only);
- big: Triton alone at b = 262144 and 1048576 (peak memory at 1M is a goal of issue 6).
Records go to OUTDIR (copy them to benchmarks/results/). Run it with the device tool as
`mkdir -p $OUT/loss && python3 benchmarks/loss_gpu.py $OUT/loss 2>&1 | tee $OUT/loss/run.log`.
"""
import argparse
import json
import sys
from pathlib import Path

from gpu_call import Budget, gpu_env, print_device

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--phases", default="pytest,sweep,bench,fused,big")
ap.add_argument("--tiles", default=None, help="forward tiles BM,BN,BK,BD,warps,stages (skips the sweep)")
ap.add_argument("--bwd-tiles", default=None, help="backward tiles BM,BN,BK,BD,warps,stages[,full]")
args = ap.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
env = gpu_env()
sh = Budget(out, env).sh
phases = args.phases.split(",")
print_device()
tiles = args.tiles or "128,128,64,128,8,3"

if "pytest" in phases:
    # fixed tiles (the autotuner would compile every candidate per (d, dtype)): FULL backward on
    # every case, then the d-chunked backward on the bf16 ones
    pt = [sys.executable, "-m", "pytest", "-q", "-x", "kernels/test_contrastive.py", "-p", "no:cacheprovider", "-k"]
    env.update(CTVLP_CLIP_TILES="128,128,64,128,8,3", CTVLP_CLIP_BWD_TILES="64,64,64,512,8,2,1")
    sh(pt + ["cuda"], "pytest_cuda.log", 200)
    env["CTVLP_CLIP_BWD_TILES"] = "64,64,64,128,8,3"
    sh(pt + ["cuda and dtype2"], "pytest_cuda_chunked.log", 100)

sweep_code = r'''
import json, os, sys, torch
sys.path.insert(0, os.getcwd())
from ctvlp_dist.bench.loss import _inputs, _cuda_time
from kernels import contrastive_triton as ct
b, d = 16384, 512
I, T, s = _inputs(b, d, torch.bfloat16, "cuda")
I, T = I.detach(), T.detach()
s1 = s.detach().reshape(1)
g = torch.arange(b, device="cuda", dtype=torch.int32)
n_rows = torch.ones(b, device="cuda")
lse_r, cmax, csum, _ = ct.triton_forward(I, T, s1, g, g, True, tiles=ct.pick_tiles(d, I.dtype))
lse_c = ct.merge_column_stats(cmax, csum)
res = []
for which, cfgs in (("fwd", sys.argv[1]), ("bwd", sys.argv[2])):
    for cfg in cfgs.split(";"):
        t = ct._as_tiles([int(x) for x in cfg.split(",")], d, I.dtype.itemsize)
        if which == "fwd":
            fn = lambda: ct.triton_forward(I, T, s1, g, g, True, tiles=t)
        else:
            fn = lambda: ct.triton_backward(I, T, s1, g, g, lse_r, lse_c, n_rows, 1.0 / b, True, tiles=t)
        try:
            ms = _cuda_time(fn, reps=5, warmup=1) * 1e3
            flops = (2 if which == "fwd" else 6) * b * b * d  # counted: fwd S; bwd S once + two gradient dots
            r = {"pass": which, "tiles": cfg, "ms": round(ms, 3), "tflops_counted": round(flops / ms / 1e9, 1)}
        except Exception as e:
            r = {"pass": which, "tiles": cfg, "error": f"{type(e).__name__}: {str(e)[:160]}"}
        print(json.dumps(r), flush=True)
        res.append(r)
print("SWEEP", json.dumps(res))
'''
FWD = ["128,128,64,128,8,3", "128,64,64,128,8,3", "64,64,64,128,4,3", "128,128,32,128,8,4", "64,128,64,128,4,3",
       "128,128,64,128,8,4", "128,64,64,128,4,3", "256,64,64,128,8,3"]
BWD = ["64,64,64,512,8,3", "128,64,64,256,8,3", "64,64,64,512,8,2,1", "64,32,64,512,8,3,1", "128,64,64,512,8,2,1",
       "64,64,64,512,4,2,1", "128,32,64,512,8,2,1", "128,128,64,128,8,3", "64,128,64,512,8,2,1"]
bwd_tiles = args.bwd_tiles or "64,64,64,512,8,3"
if "sweep" in phases and not args.tiles:
    r = sh([sys.executable, "-c", sweep_code, ";".join(FWD), ";".join(BWD)], "sweep.log", 300)
    sweep = json.loads([x for x in r.stdout.splitlines() if x.startswith("SWEEP")][-1][6:]) if r and "SWEEP" in r.stdout else []
    for which in ("fwd", "bwd"):
        ok = [x for x in sweep if x["pass"] == which and "ms" in x]
        if ok and which == "fwd":
            tiles = min(ok, key=lambda x: x["ms"])["tiles"]
        elif ok:
            bwd_tiles = min(ok, key=lambda x: x["ms"])["tiles"]
    (out / "sweep.json").write_text(json.dumps({"b": 16384, "d": 512, "dtype": "bfloat16", "configs": sweep,
                                                "best_fwd": tiles, "best_bwd": bwd_tiles}, indent=1))
env["CTVLP_CLIP_BWD_TILES"] = bwd_tiles
env["CTVLP_CLIP_TILES"] = tiles
print("tiles: fwd", tiles, "bwd", bwd_tiles, flush=True)
base = [sys.executable, "-m", "ctvlp_dist", "bench", "loss", "--quiet", f"bench.results_dir={out}"]
if "bench" in phases:
    sh(base + ["bench.loss_sizes=[1024,4096,16384,65536]"], "bench.log", 240)
if "big" in phases:
    sh(base + ["bench.loss_sizes=[262144,1048576]", "bench.loss_methods=[triton]"], "big.log", 200)
if "fused" in phases:
    env["CTVLP_CLIP_BACKWARD"] = "fused"  # the atomics variant, Triton only
    sh(base + ["bench.loss_sizes=[16384,65536]", "bench.loss_methods=[triton]"], "fused.log", 120)
    env.pop("CTVLP_CLIP_BACKWARD")
