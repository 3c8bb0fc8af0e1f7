"""One device call for the contrastive-loss kernels: correctness, tile sweep, benchmark.

    python3 benchmarks/loss_gpu.py OUTDIR [--phases pytest,pytest_new,sweep,bench,fused,big,panel] [--tiles FWD --bwd-tiles BWD] [--dry]

Phases, each under a share of one wall-clock budget (gpu_call.py):
- pytest: the CUDA tests in kernels/test_contrastive.py (bf16/fp16/fp32 vs fp64), fixed tiles;
- pytest_new: the same tests under the options no GPU has run yet (forward FACTOR with its
  copies through L1, a program per row block, TMA loads), in a call of their own: with pytest
  they would not fit one budget;
- sweep: forward and backward tile configs, each pass alone, at b=16384, d=512, bf16;
- bench: `ctvlp bench loss` with the best tiles: dense, chunked and Triton, b = 1k..64k;
- fused: the atomics backward at b = 16k and 64k (Triton only);
- big: Triton alone at b = 262144 and 1048576 (peak memory at 1M is a goal of issue 6);
- panel: the panel backward (contrastive_panel.py), in the order of what decides issue 6: its
  tiles and GEMM backend (Triton or cuBLAS) swept at b = 16384 against the two-pass backward in
  the same process; then `bench loss` with dense, triton-two_pass and triton-panel side by side
  up to b = 65536 (the goal's size); then the panel height at 65536 and that row again with the
  fastest; last, mixed (trained-like, scale 100) inputs.
`--phases sweep,panel` is one call: its steps' caps add up to 760 s, so the 560 s budget cuts
from the end (the least decisive steps: the height rerun and the mixed inputs). The forward
sweep holds the 2026-11-22 winners as baselines beside the FACTOR, one-row-block, TMA and L1
tiles, and the benches use its fastest forward. With the 2026-11-22 tiles and no sweep:
`--phases panel --tiles 64,128,64,128,4,3 --bwd-tiles 64,64,64,512,8,2,1`. Forward tile flags:
1 FACTOR (one exponential per element where the tile allows), 2 a program per row block (Triton
flattens its column and K loops), 4 operand blocks through tensor descriptors (TMA; for the
G tile, a sixth number of 1), 8 copies through L1 (kernels/l1_copies.py); an eighth number caps
the registers per thread (ptxas's maxnreg).
`--dry` checks the plumbing on a CPU before a GPU call is spent on it: the Triton interpreter,
fp32, tiny b, the first and last config of each list (tests/test_gpu_scripts.py).
Records go to OUTDIR (copy them to benchmarks/results/). Run it with the device tool as
`mkdir -p $OUT/loss && python3 benchmarks/loss_gpu.py $OUT/loss 2>&1 | tee $OUT/loss/run.log`.
"""
import argparse
import json
import sys
from pathlib import Path

from gpu_call import Budget, gpu_env, print_device
from loss_configs import BWD, FWD, PANEL

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--phases", default="pytest,sweep,bench,fused,big")  # panel: on request
ap.add_argument("--tiles", default=None, help="forward tiles BM,BN,BK,BD,warps,stages (skips the sweep)")
ap.add_argument("--bwd-tiles", default=None, help="backward tiles BM,BN,BK,BD,warps,stages[,full]")
ap.add_argument("--dry", action="store_true", help="CPU plumbing check: interpreter, tiny sizes, few configs")
args = ap.parse_args()
DRY = args.dry
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
env = gpu_env()
if DRY:
    env["TRITON_INTERPRET"] = "1"
sh = Budget(out, env).sh
phases = args.phases.split(",")
print_device()
tiles = args.tiles or "128,128,64,128,8,3"

# fixed tiles (the autotuner would compile every candidate per (d, dtype))
pt = [sys.executable, "-m", "pytest", "-q", "-x", "kernels/test_contrastive.py", "-p", "no:cacheprovider", "-k"]
if "pytest" in phases:
    # FULL backward on every case, then the d-chunked backward on the bf16 ones
    env.update(CTVLP_CLIP_TILES="128,128,64,128,8,3", CTVLP_CLIP_BWD_TILES="64,64,64,512,8,2,1")
    sh(pt + ["cuda"], "pytest_cuda.log", 240)
    env["CTVLP_CLIP_BWD_TILES"] = "64,64,64,128,8,3"
    sh(pt + ["cuda and dtype2"], "pytest_cuda_chunked.log", 100)
if "pytest_new" in phases:
    # forward FACTOR, its copies through L1
    env.update(CTVLP_CLIP_TILES="64,128,64,128,4,3,9", CTVLP_CLIP_BWD_TILES="64,64,64,512,8,2,1")
    sh(pt + ["cuda and not fused"], "pytest_cuda_factor.log", 150)
    env["CTVLP_CLIP_TILES"] = "128,64,64,128,4,3,3"  # forward FACTOR, a program per row block (flattened loops)
    sh(pt + ["cuda and not fused"], "pytest_cuda_one_rb.log", 150)
    # TMA operand loads (flag bit 4; the G tile's sixth number); d = 300 in bf16 is not 16-byte strided
    # with FACTOR, a program per row block, 8 warps and the registers capped (an eighth number)
    env.update(CTVLP_CLIP_TILES="64,128,64,128,8,3,7,128", CTVLP_CLIP_BWD_TILES="64,64,64,512,8,2,5",
               CTVLP_CLIP_PANEL_TILES="128,64,64,8,3,1;128,128,64,8,3")
    sh(pt + ["cuda and not fused"], "pytest_cuda_tma.log", 150)
    env.pop("CTVLP_CLIP_PANEL_TILES")

timing = r'''
import json, os, sys, time, torch
sys.path.insert(0, os.getcwd())
from ctvlp_dist.bench.loss import _inputs, _cuda_time
dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: --dry, in the interpreter
dt = torch.bfloat16 if dev == "cuda" else torch.float32


def _time(fn):
    if dev == "cuda":
        return _cuda_time(fn, reps=5, warmup=1)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
'''
sweep_code = timing + r'''
from kernels import contrastive_triton as ct
b, d = int(sys.argv[3]), 512
I, T, s = _inputs(b, d, dt, dev)
I, T = I.detach(), T.detach()
s1 = s.detach().reshape(1)
g = torch.arange(b, device=dev, dtype=torch.int32)
n_rows = torch.ones(b, device=dev)
lse_r, cmax, csum, _ = ct.triton_forward(I, T, s1, g, g, True, tiles=ct.pick_tiles(d, I.dtype))
lse_c = ct.merge_column_stats(cmax, csum)
ceil = {}
if dev == "cuda":  # matmul, copy and L2-read ceilings in this process: each row's rates against them
    from ctvlp_dist.bench.loss import gpu_ceilings
    ceil = gpu_ceilings()
    print(json.dumps({"ceilings": ceil}), flush=True)
for which, cfgs in (("fwd", sys.argv[1]), ("bwd", sys.argv[2])):
    for cfg in cfgs.split(";"):
        t = ct._as_tiles([int(x) for x in cfg.split(",")], d, I.dtype.itemsize)
        if which == "fwd":
            fn = lambda: ct.triton_forward(I, T, s1, g, g, True, tiles=t)
        else:
            fn = lambda: ct.triton_backward(I, T, s1, g, g, lse_r, lse_c, n_rows, 1.0 / b, True, tiles=t)
        try:
            ms = _time(fn) * 1e3
            flops = (2 if which == "fwd" else 6) * b * b * d  # counted: fwd S; bwd S once + two gradient dots
            l2 = ct.l2_bytes(b, b, d, I.element_size(), t, which)  # operand bytes through L2, counted
            r = {"pass": which, "tiles": cfg, "ms": round(ms, 3), "tflops_counted": round(flops / ms / 1e9, 1),
                 "l2_GB": round(l2 / 1e9, 2), "l2_GBps": round(l2 / ms / 1e6, 1)}
            if ceil.get("l2_read_GBps"):
                r["frac_of_l2_read"] = round(r["l2_GBps"] / ceil["l2_read_GBps"], 3)
        except Exception as e:
            r = {"pass": which, "tiles": cfg, "error": f"{type(e).__name__}: {str(e)[:160]}"}
        print(json.dumps(r), flush=True)  # one line per config: the parent reads them as they come
'''
if DRY:
    FWD, BWD = [FWD[0], FWD[-1]], [BWD[0], BWD[-1]]
B_SWEEP, B_PANEL, B_BENCH, B_MID, B_BIG = (256, (256, 512), "[256]", "[512]", "[512]") if DRY else (
    16384, (16384, 65536), "[1024,4096,16384,65536]", "[16384,65536]", "[262144,1048576]")
DTYPE = "float32" if DRY else "bfloat16"  # as the inline scripts choose it
bwd_tiles = args.bwd_tiles or "64,64,64,512,8,3"
if "sweep" in phases and not args.tiles:
    sh([sys.executable, "-c", sweep_code, ";".join(FWD), ";".join(BWD), str(B_SWEEP)], "sweep.log", 200)
    # one JSON line per config, so the configs timed before a timeout still count
    log = out / "sweep.log"
    sweep = [json.loads(x) for x in log.read_text().splitlines() if x.startswith('{"pass"')] if log.exists() else []
    for which in ("fwd", "bwd"):
        ok = [x for x in sweep if x["pass"] == which and "ms" in x]
        if ok and which == "fwd":
            tiles = min(ok, key=lambda x: x["ms"])["tiles"]
        elif ok:
            bwd_tiles = min(ok, key=lambda x: x["ms"])["tiles"]
    ceil = [json.loads(x)["ceilings"] for x in log.read_text().splitlines() if x.startswith('{"ceilings"')] if log.exists() else []
    (out / "sweep.json").write_text(json.dumps({"b": B_SWEEP, "d": 512, "dtype": DTYPE, "ceilings": ceil[:1], "configs": sweep,
                                                "best_fwd": tiles, "best_bwd": bwd_tiles}, indent=1))
env["CTVLP_CLIP_BWD_TILES"] = bwd_tiles
env["CTVLP_CLIP_TILES"] = tiles
print("tiles: fwd", tiles, "bwd", bwd_tiles, flush=True)
# not --quiet: each row is printed as it is measured, so a step cut short still logs its rows
base = [sys.executable, "-m", "ctvlp_dist", "bench", "loss", f"bench.results_dir={out}"]
if "bench" in phases:
    sh(base + [f"bench.loss_sizes={B_BENCH}"], "bench.log", 240)
if "big" in phases:
    sh(base + [f"bench.loss_sizes={B_BIG}", "bench.loss_methods=[triton]"], "big.log", 200)
if "fused" in phases:
    env["CTVLP_CLIP_BACKWARD"] = "fused"  # the atomics variant, Triton only
    sh(base + [f"bench.loss_sizes={B_MID}", "bench.loss_methods=[triton]"], "fused.log", 120)
    env.pop("CTVLP_CLIP_BACKWARD")

panel_code = timing + r'''
from kernels import contrastive_panel as cp, contrastive_triton as ct
b, d = int(sys.argv[3]), 512
I, T, s = _inputs(b, d, dt, dev)
I, T, s1 = I.detach(), T.detach(), s.detach().reshape(1)
g = torch.arange(b, device=dev, dtype=torch.int32)
n_rows = torch.ones(b, device=dev)
lse_r, cmax, csum, _ = ct.triton_forward(I, T, s1, g, g, True)
lse_c = ct.merge_column_stats(cmax, csum)
ref = ct.triton_backward(I, T, s1, g, g, lse_r, lse_c, n_rows, 1.0 / b, True)
flops = 6 * b * b * d  # counted: S once + the dI and dT GEMMs
res = [{"variant": "two_pass", "ms": round(_time(lambda: ct.triton_backward(I, T, s1, g, g, lse_r, lse_c, n_rows,
                                                                           1.0 / b, True)) * 1e3, 3)}]
for cfg in sys.argv[1].split("|"):
    tiles, _, rows = cfg.partition("@")
    os.environ["CTVLP_CLIP_PANEL_TILES"] = tiles
    os.environ["CTVLP_CLIP_PANEL_ROWS"] = rows or "0"
    for mm in sys.argv[2].split(","):
        fn = lambda: cp.panel_backward(I, T, s1, g, g, lse_r, lse_c, n_rows, 1.0 / b, True, mm=mm)
        r = {"variant": "panel", "tiles": tiles, "panel_rows": cp.panel_rows(b, b, 2, int(tiles.split(",")[0])), "mm": mm}
        try:
            out = fn()
            r["max_rel_diff_vs_two_pass"] = max(float((a.float() - c.float()).norm() / c.float().norm()) for a, c in zip(out, ref))
            r["ms"] = round(_time(fn) * 1e3, 3)
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        res.append(r)
        print(json.dumps(r), flush=True)
for r in res:
    if "ms" in r:
        r["tflops_counted_6b2d"] = round(flops / r["ms"] / 1e9, 1)
        r["speedup_vs_two_pass"] = round(res[0]["ms"] / r["ms"], 3)
print("PANEL", json.dumps(res))
'''
if "panel" in phases:  # in the order of what decides issue 6, so that a short budget cuts the least
    found = {}
    if DRY:
        PANEL = [PANEL[0], PANEL[-1]]

    def panel_run(b, cfgs, mms, cap):
        r = sh([sys.executable, "-c", panel_code, "|".join(cfgs), mms, str(b)], f"panel_{b}.log", cap)
        if r and "PANEL" in r.stdout:
            found[b] = json.loads([x for x in r.stdout.splitlines() if x.startswith("PANEL")][-1][6:])

    def best_panel():  # the largest gain over the two-pass backward timed in the same process
        ok = [x for x in found.get(B_PANEL[0], []) if "ms" in x and x["variant"] == "panel"]
        return max(ok, key=lambda x: x["speedup_vs_two_pass"]) if ok else None

    def use(best):
        env.update(CTVLP_CLIP_PANEL_TILES=best["tiles"], CTVLP_CLIP_PANEL_MM=best["mm"])
        if best in found.get(B_PANEL[1], []):
            env["CTVLP_CLIP_PANEL_ROWS"] = str(best["panel_rows"])

    # 1. panel tiles and GEMM backend at 16,384; 2. the goal's measurement (b = 65,536, beside
    # dense and the two-pass backward, with the sweep's forward); 3. the panel height at 65,536,
    # then the 65,536 row again with the fastest; 4. trained-like inputs
    panel_run(B_PANEL[0], PANEL, "triton,torch", 150)
    best = best_panel()
    if best:
        use(best)
    methods = "bench.loss_methods=[dense,triton-two_pass,triton-panel]"
    sh(base + [f"bench.loss_sizes={B_BENCH}", methods], "panel_bench.log", 150)
    best = best or {"tiles": PANEL[0], "mm": "triton"}
    panel_run(B_PANEL[1], [best["tiles"] + f"@{r}" for r in (2048, 4096, 8192)], best["mm"], 100)
    (out / "panel.json").write_text(json.dumps({"d": 512, "dtype": DTYPE, "runs": found}, indent=1))
    rows_goal = [x for x in found.get(B_PANEL[1], []) if "ms" in x and x["variant"] == "panel"]
    if rows_goal:  # the goal's size again, with its fastest panel height
        use(min(rows_goal, key=lambda x: x["ms"]))
        sh(base + [f"bench.loss_sizes=[{B_PANEL[1]}]", "bench.loss_methods=[triton-panel]"], "panel_rows_bench.log", 60)
    sh(base + [f"bench.loss_sizes={B_MID}", "bench.loss_methods=[triton-two_pass,triton-panel]",
               "bench.loss_inputs=mixed"], "panel_mixed.log", 100)
