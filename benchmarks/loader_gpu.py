"""One device call for the data path: DALI's GPU inflate and augmentation against the torch loader
with 8 workers, and against what one training step consumes. Offline: what is missing is
installed from --wheels DIR (pip --no-index); 8 minutes or less on one H100.

    python3 benchmarks/loader_gpu.py OUTDIR [--wheels DIR] [--patients 64]
    python3 benchmarks/loader_gpu.py OUTDIR --dry        # CPU plumbing check (tests/test_gpu_scripts.py)

Steps, under one wall-clock budget (gpu_call.py; CTVLP_GPU_BUDGET_S, default 460 s here):
1. deps: each module the run imports, or its wheel from --wheels; a clear error otherwise.
2. check: on a small synthetic cohort, DALI on the GPU (lz4 through fn.decoders.inflate) against
   the torch loader, per key: bit-identical centre crops and augmented crops, both codecs ->
   OUTDIR/check.json (CPU arithmetic is bit-exact in the tests; this says whether the GPU's is).
3. bench: `ctvlp bench loader` at the stored 120x240x240, crops 96x192x192, batch 4, 8 workers,
   the torch loader with worker threads and with worker processes, the per-file baselines, and
   the image tower's training step (bf16) as what a step consumes. Goals: DALI >= 3x the torch
   loader, >= 2x the step. The record lands in OUTDIR (copy it to benchmarks/results/).
Run it with the device tool as
`mkdir -p $OUT/loader && python3 benchmarks/loader_gpu.py $OUT/loader 2>&1 | tee $OUT/loader/run.log`.
"""
import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from gpu_call import Budget, gpu_env, print_device

NEEDS = {"nvidia.dali": "nvidia-dali-cuda130", "lz4": "lz4", "yaml": "pyyaml", "tqdm": "tqdm"}

CHECK = r"""
import json, sys, dataclasses, torch
from pathlib import Path
from ctvlp_dist.config import LoaderConfig, load_config
from ctvlp_dist.data import CTLoader, build_loader
from data_shards.synth.cohort import run_synth
out, shape = Path(sys.argv[1]), tuple(json.loads(sys.argv[2]))
spacing = [288 / shape[0], 360 / shape[1], 360 / shape[2]]  # the 16x40x40 test grid's field of view
rows = []
for codec in ("npy", "lz4"):
    root = out / f"check-{codec}"
    run_synth(load_config(None, [f"synth.out={root}", "synth.patients=6", f"synth.shape={list(shape)}",
                                 f"synth.spacing={spacing}", f"shard.codec={codec}", "synth.workers=1"]), progress=False)
    for train in (False, True):
        cfg = LoaderConfig(batch_size=2, num_workers=2, crop=(shape[0] - 4, shape[1] + 8, shape[2] - 8), shuffle=False,
                           train=train, flip_axes=(0, 1, 2), last_batch="pad")
        dali = build_loader(root, dataclasses.replace(cfg, backend="dali"), split=None)
        ref = {k: v for b in CTLoader(root, cfg, split=None) for k, v in zip(b.key, b.volume)}
        got = {k: v.cpu() for b in dali for k, v in zip(b.key, b.volume)}
        diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        rows.append({"codec": codec, "train": train, "device": dali.device, "samples": len(ref),
                     "max_abs_diff": diff, "bit_identical": all(torch.equal(got[k], ref[k]) for k in ref)})
        print(rows[-1], flush=True)
(out / "check.json").write_text(json.dumps(rows, indent=1))
"""


def ensure(wheels: str | None) -> None:
    missing = []
    for mod, pkg in NEEDS.items():
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(pkg)
    if not missing:
        return
    if not wheels:
        sys.exit(f"missing {missing}: pass --wheels DIR holding their wheels (pip download {' '.join(missing)} -d DIR)")
    print("installing from", wheels, missing, flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels, *missing],
                   check=True)


ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--wheels", help="a folder of wheels for what the GPU image lacks (nvidia-dali-cuda130, lz4, ...)")
ap.add_argument("--patients", type=int, default=64)
ap.add_argument("--dry", action="store_true", help="CPU plumbing check: tiny volumes, DALI CPU-only")
args = ap.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("CTVLP_GPU_BUDGET_S", "460")
print_device()
ensure(args.wheels)
sh = Budget(out, gpu_env()).sh
shape = [16, 40, 40] if args.dry else [48, 96, 96]
sh([sys.executable, "-c", CHECK, str(out), json.dumps(shape)], "check.log", 120)
bench = [sys.executable, "-m", "ctvlp_dist", "bench", "loader", "--quiet", f"bench.results_dir={out}",
         "bench.loader_worker_types=[thread,process]"]
if args.dry:
    bench += ["bench.patients=3", "synth.shape=[16,40,40]", "synth.spacing=[18,9,9]", "loader.crop=[8,16,16]",
              "loader.num_workers=1", "bench.repeats=1"]
else:
    bench += [f"bench.patients={args.patients}", "loader.num_workers=8", "loader.batch_size=4", "synth.workers=16"]
sh(bench, "bench.log", 400)
print("records:", sorted(p.name for p in out.glob("*.json")), flush=True)
