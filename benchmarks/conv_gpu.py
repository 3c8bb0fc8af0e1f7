"""One device call for the conv3d kernels: correctness on the chip, then the benchmarks.

    python3 benchmarks/conv_gpu.py OUTDIR --phases tower,pytest_new       # the next GPU call
    python3 benchmarks/conv_gpu.py OUTDIR [--phases layers,blocks]        # the user's benchmark
    python3 benchmarks/conv_gpu.py OUTDIR --phases pytest                 # a call of its own
    python3 benchmarks/conv_gpu.py OUTDIR --phases compile                # a call of its own
    python3 benchmarks/conv_gpu.py OUTDIR --phases tiles                  # a call of its own

Phases, each under a share of one wall-clock budget (gpu_call.py):
- pytest: production's tests (kernels/test_conv3d.py, test_conv3d_block.py) on CUDA, bf16
  included, which the interpreter cannot check; minutes of compiling: a call of its own;
- pytest_new: the CUDA tests of the candidate defaults (kernels/tuning/test_conv3d_variants.py:
  the tap K loops, swapped tiles, L1 copies, the fused block under each): it fits beside the
  tower in one call;
- layers, blocks: `ctvlp bench conv` with that part alone (cuDNN eager is the baseline);
- tower: `python -m kernels.tuning.bench_conv --parts tower`: cuDNN eager, production's kernels
  and each candidate variant (tap K loop; swapped 64-channel tiles with the 256- and the
  512-voxel forward; for inference also with the activation copies through L1), inference first
  (also replayed as a CUDA graph), each row with its bf16 agreement and launch counts;
- compile: the production tower against torch.compile(mode="max-autotune"), whose autotuning
  takes minutes: a call of its own;
- launches: every kernel launch of one fused block's training step (layer1.0, layer2.0,
  layer4.1), timed alone and with its fusion flags off, then under each sweep tile;
- tiles: each kernel of each layer under every tile of the sweep grid against cuDNN's same
  operation; best_tiles in the record says which tile to make the default.
`--dry` (a CPU check, tests/test_gpu_scripts.py): the pytest phases only collect their tests.
Records go to OUTDIR (copy them to benchmarks/results/). Run it with the device tool as
`mkdir -p $OUT/conv && python3 benchmarks/conv_gpu.py $OUT/conv 2>&1 | tee $OUT/conv/run.log`.
"""
import argparse
import sys
from pathlib import Path

from gpu_call import Budget, gpu_env, print_device

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--phases", default="layers,blocks,tower")
ap.add_argument("--dry", action="store_true", help="CPU plumbing check: pytest phases only collect their tests")
args = ap.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
sh = Budget(out, gpu_env()).sh
dry = ["--collect-only"] if args.dry else []
phases = args.phases.split(",")
print_device()

if "pytest" in phases:  # the kernels first (bf16), then the fused blocks
    sh([sys.executable, "-m", "pytest", "-q", "kernels/test_conv3d.py", "-p", "no:cacheprovider", *dry], "pytest_conv.log", 200)
    sh([sys.executable, "-m", "pytest", "-q", "kernels/test_conv3d_block.py", "-p", "no:cacheprovider", *dry],
       "pytest_block.log", 340)
# not --quiet: each row is printed as it is measured, so a step cut short by its cap still logs
# the rows before the cut (the record itself is written at the end)
bench = [sys.executable, "-m", "ctvlp_dist", "bench", "conv", f"bench.results_dir={out}"]
tuning = [sys.executable, "-m", "kernels.tuning.bench_conv", str(out)]
# Triton compiles on first use; each tower variant compiles its kernels for every layer, so the
# tower gets the most time (inference rows first: they decide the open 1.5x goal)
if "tower" in phases:
    sh(tuning + ["--parts", "tower"], "tower.log", 400)
if "pytest_new" in phases:  # after the tower: the candidate defaults' tests
    sh([sys.executable, "-m", "pytest", "-q", "kernels/tuning/test_conv3d_variants.py", "-p", "no:cacheprovider",
        "-k", "cuda or under_a_variant or through_l1 or swapped_operands", *dry], "pytest_new.log", 240)
for part, cap in (("layers", 100), ("blocks", 120)):
    if part in phases:
        sh(bench + [f"bench.conv_parts=[{part}]", "bench.conv_compile=false"], f"{part}.log", cap)
if "launches" in phases:
    sh(tuning + ["--parts", "launches", "--budget-s", "230"], "launches.log", 330)
if "compile" in phases:
    sh(bench + ["bench.conv_parts=[tower]", "bench.conv_compile=true"], "compile.log", 550)
if "tiles" in phases:
    sh(tuning + ["--parts", "tiles", "--budget-s", "420"], "tiles.log", 550)
