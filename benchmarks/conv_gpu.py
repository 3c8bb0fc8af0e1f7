"""One device call for the conv3d kernels (issue 7): correctness on the chip, then the benchmark.

    python3 benchmarks/conv_gpu.py OUTDIR [--phases layers,blocks,tower]          # first call
    python3 benchmarks/conv_gpu.py OUTDIR --phases tower,pytest_new               # the next GPU call
    python3 benchmarks/conv_gpu.py OUTDIR --phases pytest                         # a call of its own
    python3 benchmarks/conv_gpu.py OUTDIR --phases compile                        # second call
    python3 benchmarks/conv_gpu.py OUTDIR --phases tiles                          # third call
    python3 benchmarks/conv_gpu.py OUTDIR --phases layers,blocks,tower,launches   # after a tile change

Phases, each under a share of one wall-clock budget (gpu_call.py):
- pytest: kernels/test_conv3d.py and test_conv3d_block.py on CUDA (bf16 included, which the
  interpreter cannot check). Compiling every tested variant takes minutes (on 2026-11-23 the
  block tests alone took 290 s for 36 of 37), so it is not a default phase: a call of its own;
- pytest_new: only the CUDA tests of the candidate defaults (the tap K loop in bf16, the swapped
  tiles, the fused block under both, the activations through L1), 31 tests: it fits beside the
  tower in one call;
- layers, blocks, tower: `ctvlp bench conv` with that part alone (cuDNN eager is the baseline;
  the tower also with the tap K loop, with the tap loop plus swapped 64-channel forward and
  dgrad tiles (conv3d.SWAP_NARROW: the 256-voxel forward, and again with the 512-voxel one),
  for inference also with the activation copies through L1 (conv3d.ACT_L1), and inference
  replayed as a CUDA graph);
- compile: the tower again with torch.compile(mode="max-autotune"). Its autotuning takes minutes
  for the training graph and again for inference, so it is not a default phase: give it a
  device call of its own;
- launches: every kernel launch of one fused block's training step (layer1.0, layer2.0,
  layer4.1), timed alone and with its fusion flags off, then under each sweep tile;
- tiles: each kernel (forward, dgrad, wgrad) of each layer under every tile of the sweep grid
  (kernels.conv3d.TILE_GRID; forward and dgrad also under SWAP_TILES) against cuDNN's same operation; best_tiles in the record says which
  tile to make the default. Compiling ~50 variants takes minutes: a call of its own.
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

if "pytest" in phases:  # the kernels first (flat and tap K loops, bf16), then the fused blocks
    sh([sys.executable, "-m", "pytest", "-q", "kernels/test_conv3d.py", "-p", "no:cacheprovider", *dry], "pytest_conv.log", 200)
    sh([sys.executable, "-m", "pytest", "-q", "kernels/test_conv3d_block.py", "-p", "no:cacheprovider", *dry],
       "pytest_block.log", 340)
# not --quiet: each row is printed as it is measured, so a step cut short by its cap still logs
# the rows before the cut (the record itself is written at the end)
bench = [sys.executable, "-m", "ctvlp_dist", "bench", "conv", f"bench.results_dir={out}"]
# Triton compiles on first use; the tower's Triton configurations (flat, tap, two swapped
# forwards, and for inference the L1 copies) each compile their kernels for every layer, so it
# gets the most time (inference rows first: they decide issue 7's open goal)
for part, cap in (("layers", 100), ("blocks", 120), ("tower", 400)):
    if part in phases:
        sh(bench + [f"bench.conv_parts=[{part}]", "bench.conv_compile=false"], f"{part}.log", cap)
if "pytest_new" in phases:  # after the tower, whose inference rows decide issue 7: the candidate defaults' tests
    sh([sys.executable, "-m", "pytest", "-q", "kernels/test_conv3d.py", "kernels/test_conv3d_block.py",
        "-p", "no:cacheprovider", "-k", "(cuda_bf16 and tap) or swapped_operands or swapped_tiles or block_with_tap or through_l1", *dry],
       "pytest_new.log", 240)
if "launches" in phases:
    sh(bench + ["bench.conv_parts=[launches]", "bench.conv_tile_budget_s=230"], "launches.log", 330)
if "compile" in phases:
    sh(bench + ["bench.conv_parts=[tower]", "bench.conv_compile=true"], "compile.log", 550)
if "tiles" in phases:
    sh(bench + ["bench.conv_parts=[tiles]", "bench.conv_tile_budget_s=420"], "tiles.log", 550)
