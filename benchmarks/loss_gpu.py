"""One device call for the contrastive-loss kernels: correctness, tile sweep, benchmark.

    python3 benchmarks/loss_gpu.py OUTDIR

1. pytest of the CUDA tests in kernels/test_contrastive.py (bf16/fp16/fp32 vs fp64);
2. a sweep of tile configs at b=16384, d=512, bf16 (forward+backward, CUDA events, median of 5);
3. `ctvlp bench loss` with the best tiles: dense, chunked and Triton up to b=65536; the fused
   (atomics) backward at b=16384 and 65536; Triton alone at b=262144 and 1048576.
Records go to OUTDIR (copy them to benchmarks/results/). Run it with the device tool as
`python3 benchmarks/loss_gpu.py $OUT/loss 2>&1 | tee $OUT/loss/run.log` (mkdir first).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
root = Path(__file__).resolve().parents[1]
env = {**os.environ, "PYTHONPATH": str(root)}
env.pop("TRITON_INTERPRET", None)


def sh(cmd, log, timeout):
    """Run a step; its full output goes to OUTDIR/log when `log` is set (the device tool returns
    at most 8 files: the caller tees stdout into run.log anyway)."""
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if log:
        (out / log).write_text(r.stdout + "\n" + r.stderr)
    print("\n".join((r.stdout + r.stderr).strip().splitlines()[-12:]), flush=True)
    return r


sh([sys.executable, "-m", "pytest", "-q", "-x", "kernels/test_contrastive.py", "-k", "cuda", "-p", "no:cacheprovider"],
   "pytest_cuda.log", 600)

sweep_code = r'''
import json, os, sys, torch
sys.path.insert(0, os.getcwd())
from ctvlp_dist.bench.loss import _inputs, _cuda_time
from kernels.contrastive import blockwise_clip_loss
b, d = 16384, 512
I, T, s = _inputs(b, d, torch.bfloat16, "cuda")
res = []
for cfg in ["128,128,64,128,8,3", "128,128,64,256,8,3", "128,64,64,256,8,3", "64,128,64,256,4,3", "128,128,64,512,8,2",
            "64,64,64,512,4,2", "128,128,32,128,8,4", "256,128,64,128,8,3", "128,256,64,128,8,3", "64,64,64,128,4,4"]:
    os.environ["CTVLP_CLIP_TILES"] = cfg
    def run():
        I.grad = T.grad = s.grad = None
        blockwise_clip_loss(I, T, s, impl="triton").backward()
    try:
        t = _cuda_time(run, reps=5, warmup=1)
        r = {"tiles": cfg, "ms": round(t * 1e3, 3), "tflops_8b2d": round(8 * b * b * d / t / 1e12, 1)}
    except Exception as e:
        r = {"tiles": cfg, "error": f"{type(e).__name__}: {str(e)[:160]}"}
    print(json.dumps(r), flush=True)
    res.append(r)
print("SWEEP", json.dumps(res))
'''
r = sh([sys.executable, "-c", sweep_code], None, 900)
sweep = json.loads([l for l in r.stdout.splitlines() if l.startswith("SWEEP")][-1][6:]) if "SWEEP" in r.stdout else []
ok = [x for x in sweep if "ms" in x]
best = min(ok, key=lambda x: x["ms"])["tiles"] if ok else None
(out / "sweep.json").write_text(json.dumps({"b": 16384, "d": 512, "dtype": "bfloat16", "configs": sweep, "best": best}, indent=1))
if best:
    env["CTVLP_CLIP_TILES"] = best
print("best tiles:", best, flush=True)
base = [sys.executable, "-m", "ctvlp_dist", "bench", "loss", "--quiet", f"bench.results_dir={out}"]
sh(base + ["bench.loss_sizes=[1024,4096,16384,65536]"], None, 1200)
env["CTVLP_CLIP_BACKWARD"] = "fused"  # the atomics variant, same sizes, Triton only
sh(base + ["bench.loss_sizes=[16384,65536]", "bench.loss_methods=[triton]"], None, 600)
env.pop("CTVLP_CLIP_BACKWARD")
sh(base + ["bench.loss_sizes=[262144,1048576]", "bench.loss_methods=[triton]"], None, 330)
