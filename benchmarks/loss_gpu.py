"""One device call for the contrastive-loss kernels: correctness, tile sweep, benchmark.

    python3 benchmarks/loss_gpu.py OUTDIR [--phases pytest,pytest_new,sweep,bench,big,panel] [--dry]

Phases, each under a share of one wall-clock budget (gpu_call.py):
- pytest: production's CUDA tests (kernels/test_contrastive.py: bf16/fp16/fp32 against fp64, the
  measured tiles and the d-chunked backward);
- pytest_new: the untimed variants' CUDA tests (kernels/tuning/test_loss_variants.py: FACTOR with
  L1 copies, a program per row block, TMA with a register cap, the panel backward), in a call of
  their own: beside pytest they would not fit one budget;
- sweep: forward and backward tiles (loss_configs.py), each pass alone, at b = 16,384, d = 512,
  bf16, on the variant kernels (flag 0 is production's loop), with each tile's counted L2 bytes
  against the L2 read ceiling measured in the same process;
- bench: `ctvlp bench loss` (dense, chunked, production Triton) from b = 1k to 64k, with the
  sweep's fastest plain tiles (those production can run) passed as kernels.clip_*_tiles;
- big: production Triton alone at b = 262,144 and 1,048,576 (peak memory at 1M is a goal);
- panel: the panel backward (kernels/tuning/panel.py) in the order of what decides the 50% goal:
  its tiles and GEMM backend swept at b = 16,384 against the two-pass backward in the same
  process; then dense, production and the sweep's forward with the best panel side by side up
  to b = 65,536 (the goal's size); then the panel height at 65,536; last, mixed inputs.
`--phases sweep,panel` is one call; the budget cuts from the end (the least decisive steps).
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
ap.add_argument("--phases", default="pytest,sweep,bench,big")  # panel, pytest_new: on request
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
if DRY:
    FWD, BWD, PANEL = [FWD[0], FWD[-1]], [BWD[0], BWD[-1]], [PANEL[0], PANEL[-1]]
B_SWEEP, B_PANEL, B_BENCH, B_MID, B_BIG, D = (256, (256, 512), "256", "512", "[512]", 64) if DRY else (
    16384, (16384, 65536), "1024,4096,16384,65536", "16384,65536", "[262144,1048576]", 512)

pt = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cuda"]
if DRY:
    pt.append("--collect-only")
if "pytest" in phases:
    sh(pt + ["kernels/test_contrastive.py"], "pytest_cuda.log", 300)
if "pytest_new" in phases:
    sh(pt + ["kernels/tuning/test_loss_variants.py"], "pytest_cuda_variants.log", 450)

sweep_code = r'''
import json, sys, torch
from ctvlp_dist.bench.loss import gpu_ceilings, loss_inputs
from kernels.contrastive_ref import merge_column_stats
from kernels.tuning import loss_variants as lv
from kernels.tuning.bench_conv import l2_ceiling
from kernels.tuning.bench_loss import timed
dev, dt = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)  # cpu: --dry
b, d = int(sys.argv[3]), int(sys.argv[4])
I, T, s = loss_inputs(b, d, dt, dev)
I, T, s1 = I.detach(), T.detach(), s.detach().reshape(1)
g = torch.arange(b, device=dev, dtype=torch.int32)
n_rows = torch.ones(b, device=dev)
lse_r, cmax, csum, _ = lv.triton_forward(I, T, s1, g, g, True, tiles=sys.argv[1].split(";")[0])
lse_c = merge_column_stats(cmax, csum)
ceil = {**gpu_ceilings(), **l2_ceiling()} if dev == "cuda" else {}
print(json.dumps({"ceilings": ceil}), flush=True)
for which, cfgs in (("fwd", sys.argv[1]), ("bwd", sys.argv[2])):
    for cfg in cfgs.split(";"):
        t = lv.parse_tiles(cfg, d, I.element_size())
        if which == "fwd":
            fn = lambda: lv.triton_forward(I, T, s1, g, g, True, tiles=t)
        else:
            fn = lambda: lv.triton_backward(I, T, s1, g, g, lse_r, lse_c, n_rows, 1.0 / b, True, tiles=t)
        try:
            ms = timed(fn) * 1e3
            flops = (2 if which == "fwd" else 6) * b * b * d  # counted: fwd S; bwd S once + two gradient dots
            l2 = lv.l2_bytes(b, b, d, I.element_size(), t, which)  # operand bytes through L2, counted
            r = {"pass": which, "tiles": cfg, "ms": round(ms, 3), "tflops_counted": round(flops / ms / 1e9, 1),
                 "l2_GB": round(l2 / 1e9, 2), "l2_GBps": round(l2 / ms / 1e6, 1)}
            if ceil.get("l2_read_GBps"):
                r["frac_of_l2_read"] = round(r["l2_GBps"] / ceil["l2_read_GBps"], 3)
        except Exception as e:
            r = {"pass": which, "tiles": cfg, "error": f"{type(e).__name__}: {str(e)[:160]}"}
        print(json.dumps(r), flush=True)  # one line per config: the parent reads them as they come
'''


def plain(tiles: str, which: str) -> bool:
    """Whether production can run this sweep tile: no variant flag (backward: FULL only), no cap."""
    c = tiles.split(",")
    return len(c) <= 7 and int(c[6] if len(c) > 6 else 0) in ((0,) if which == "fwd" else (0, 1))


best = {"fwd": FWD[0], "bwd": BWD[0]}  # the 2026-11-22 winners, production's rule at bf16
best_plain = dict(best)
if "sweep" in phases:
    sh([sys.executable, "-c", sweep_code, ";".join(FWD), ";".join(BWD), str(B_SWEEP), str(D)], "sweep.log", 200)
    log = out / "sweep.log"  # one JSON line per config, so the configs timed before a timeout still count
    lines = log.read_text().splitlines() if log.exists() else []
    sweep = [json.loads(x) for x in lines if x.startswith('{"pass"')]
    for which in ("fwd", "bwd"):
        ok = [x for x in sweep if x["pass"] == which and "ms" in x]
        if ok:
            best[which] = min(ok, key=lambda x: x["ms"])["tiles"]
        ok = [x for x in ok if plain(x["tiles"], which)]
        if ok:
            best_plain[which] = min(ok, key=lambda x: x["ms"])["tiles"]
    ceil = [json.loads(x)["ceilings"] for x in lines if x.startswith('{"ceilings"')]
    (out / "sweep.json").write_text(json.dumps({"b": B_SWEEP, "d": D, "ceilings": ceil[:1], "configs": sweep,
                                                "best": best, "best_plain": best_plain}, indent=1))
print("tiles: best", best, "production's", best_plain, flush=True)


def tile_override(t: str, which: str) -> str:
    c = t.split(",")[:6] + ([] if which == "fwd" else [str(len(t.split(",")) > 6 and bool(int(t.split(",")[6]) & 1)).lower()])
    return f"kernels.clip_{which}_tiles=[{','.join(c)}]"


# not --quiet: each row is printed as it is measured, so a step cut short still logs its rows
base = [sys.executable, "-m", "ctvlp_dist", "bench", "loss", f"bench.results_dir={out}", f"bench.loss_dim={D}",
        tile_override(best_plain["fwd"], "fwd"), tile_override(best_plain["bwd"], "bwd")]
if "bench" in phases:
    sh(base + [f"bench.loss_sizes=[{B_BENCH}]"] + (["bench.loss_methods=[dense,chunked,triton]"] if DRY else []),
       "bench.log", 240)
if "big" in phases:
    sh(base + [f"bench.loss_sizes={B_BIG}", "bench.loss_methods=[triton]"], "big.log", 200)

panel_code = r'''
import json, sys, torch
from ctvlp_dist.bench.loss import loss_inputs
from kernels.contrastive_ref import merge_column_stats
from kernels.tuning import loss_variants as lv
from kernels.tuning.bench_loss import timed
from kernels.tuning.panel import PanelConfig, panel_backward, panel_rows
dev, dt = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
b, d = int(sys.argv[3]), int(sys.argv[4])
I, T, s = loss_inputs(b, d, dt, dev)
I, T, s1 = I.detach(), T.detach(), s.detach().reshape(1)
g = torch.arange(b, device=dev, dtype=torch.int32)
n_rows = torch.ones(b, device=dev)
lse_r, cmax, csum, _ = lv.triton_forward(I, T, s1, g, g, True, tiles="64,128,64,128,4,3")
lse_c = merge_column_stats(cmax, csum)
two_pass = lambda: lv.triton_backward(I, T, s1, g, g, lse_r, lse_c, n_rows, 1.0 / b, True, tiles=sys.argv[5])
ref = two_pass()
res = [{"variant": "two_pass", "tiles": sys.argv[5], "ms": round(timed(two_pass) * 1e3, 3)}]
for spec in sys.argv[1].split("|"):
    tiles, _, rows = spec.partition("@")
    for mm in sys.argv[2].split(","):
        cfg = PanelConfig.parse(tiles, int(rows or 0), mm)
        fn = lambda: panel_backward(I, T, s1, g, g, lse_r, lse_c, n_rows, 1.0 / b, True, config=cfg)
        r = {"variant": "panel", "tiles": tiles, "mm": mm,
             "panel_rows": panel_rows(b, b, I.element_size(), int(tiles.split(",")[0]), cfg.rows)}
        try:
            got = fn()
            r["max_rel_diff_vs_two_pass"] = max(float((a.float() - c.float()).norm() / c.float().norm())
                                                for a, c in zip(got, ref))
            r["ms"] = round(timed(fn) * 1e3, 3)
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        res.append(r)
        print(json.dumps(r), flush=True)
for r in res:
    if "ms" in r:
        r["tflops_counted_6b2d"] = round(6 * b * b * d / r["ms"] / 1e9, 1)
        r["speedup_vs_two_pass"] = round(res[0]["ms"] / r["ms"], 3)
print("PANEL", json.dumps(res))
'''
if "panel" in phases:  # in the order of what decides the 50% goal, so that a short budget cuts the least
    found = {}

    def panel_run(b, specs, mms, cap):
        r = sh([sys.executable, "-c", panel_code, "|".join(specs), mms, str(b), str(D), best_plain["bwd"]],
               f"panel_{b}.log", cap)
        if r and "PANEL" in r.stdout:
            found[b] = json.loads([x for x in r.stdout.splitlines() if x.startswith("PANEL")][-1][6:])

    def fastest(b, key="speedup_vs_two_pass"):
        ok = [x for x in found.get(b, []) if "ms" in x and x["variant"] == "panel"]
        return max(ok, key=lambda x: x[key]) if ok else None

    # 1. panel tiles and GEMM backend at 16,384; 2. the goal's measurement: dense, production and
    # the sweep's forward with the best panel, up to b = 65,536; 3. the panel height at 65,536;
    # 4. trained-like inputs
    panel_run(B_PANEL[0], PANEL, "triton,torch", 150)
    top = fastest(B_PANEL[0]) or {"tiles": PANEL[0], "mm": "triton"}
    compare = [sys.executable, "-m", "kernels.tuning.bench_loss", str(out), "--d", str(D), "--fwd", best["fwd"],
               "--panel", top["tiles"]]
    sh(compare + ["--compare", B_BENCH], "panel_bench.log", 150)
    panel_run(B_PANEL[1], [top["tiles"] + f"@{r}" for r in ((64, 128) if DRY else (2048, 4096, 8192))], top["mm"], 100)
    (out / "panel.json").write_text(json.dumps({"d": D, "runs": found}, indent=1))
    sh(compare + ["--compare", B_MID, "--inputs", "mixed"], "panel_mixed.log", 100)
