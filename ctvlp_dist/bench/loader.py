"""`ctvlp bench loader`: loader throughput at the stored size, both backends and codecs, against
the per-file baselines that CT-CLIP-style code uses, and each codec's compression.

Throughput = scans/s, and GB/s of decoded int16 voxels at the stored shape (120x240x240 by
default), for a raw pass (read + decode only) and a training pass (decode + random crop to
loader.crop + flips + HU window), per codec and per backend (`bench.loader_backends`). In the
same run, the baselines read the same scans as one file per scan through a torch DataLoader
with the same transforms, batch size and workers: `.npz` as CT-CLIP's preprocessing writes it
(np.savez of the float32 volume, read with np.load(...)["arr_0"]) and `.npy` (np.save of the
int16 volume). Every pass reads from the page cache (the files were just written): this measures
decode and transforms, not the disk. Compression ratio = raw int16 bytes / stored volume bytes,
on the synthetic cohort and, when ../shared/data is present, on the real example CT.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from ..records import markdown_table, write_result

REAL_CT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "example_ct.nii.gz"
GOALS = {"x_vs_per_file_npz": 2.0, "x_vs_per_file_npy": 1.2}  # CPU: training pass vs the per-file baselines
GPU_GOALS = {"x_vs_torch": 3.0, "x_vs_step": 2.0}  # GPU: DALI vs the torch loader, and vs what a step consumes


def _goals(rows: list[dict], goals: dict) -> dict:
    return {k: {"goal": g, "met": {f"{r['backend']} {r['dataset']}": r[k] >= g for r in rows if k in r}}
            for k, g in goals.items()}


def step_consumption(cfg, progress: bool) -> dict | None:
    """On a GPU: scans/s that one training step consumes (image tower forward + backward in bf16 at
    loader.crop and loader.batch_size, the bulk of a step), the rate a loader must beat."""
    import torch

    if not torch.cuda.is_available():
        return None
    from .train import bench_tower

    r = bench_tower(cfg, tuple(cfg.loader.crop), cfg.loader.batch_size, torch.device("cuda"), torch.bfloat16, 5)
    return {"scans_per_s": r["scans_per_s"], "seconds_per_step": r["seconds_per_step"], "batch": r["batch"],
            "crop": list(cfg.loader.crop), "dtype": "bfloat16"}


def _timed(make_iter, limit: int, repeats: int, desc: str, progress: bool) -> tuple[int, list[float]]:
    """Median-able pass times; each pass is a fresh epoch with its workers started inside. On a GPU
    host every batch ends on the GPU (a torch batch is copied there) and the pass ends with a sync."""
    import torch
    from tqdm import tqdm

    cuda = torch.cuda.is_available()
    times, n = [], 0
    for rep in range(max(1, repeats)):
        n, t0 = 0, time.perf_counter()
        for i, (real, vol) in enumerate(tqdm(make_iter(), total=limit, desc=f"{desc} pass {rep + 1}",
                                             disable=not progress)):
            n += real
            if cuda:
                vol.to("cuda", non_blocking=True)
            if i + 1 >= limit:
                break
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return n, times


def _row(n: int, times: list[float], shape) -> dict:
    dt = float(np.median(times))
    gb = n * int(np.prod(shape)) * 2 / 1e9
    return {"samples": n, "seconds": round(dt, 3), "spread_s": [round(min(times), 3), round(max(times), 3)],
            "samples_per_s": round(n / dt, 2), "decoded_GB_per_s": round(gb / dt, 3)}


def _throughput(root, cfg, raw: bool, progress: bool, workers: int, backend: str, worker_type: str) -> dict:
    from ..data import build_loader

    lcfg = dataclasses.replace(cfg.loader, raw=raw, train=not raw, last_batch="drop" if not raw else "pad",
                               num_workers=workers, backend=backend, worker_type=worker_type)
    loader = build_loader(root, lcfg, split=None)
    limit = cfg.bench.batches or len(loader)
    n, times = _timed(lambda: ((int((~b.is_pad).sum()), b.volume) for b in loader), limit, cfg.bench.repeats,
                      f"{backend} {'raw' if raw else 'train'}", progress)
    return _row(n, times, loader.index.manifest["preprocessing"]["stored_shape"])


def write_per_file(root: Path, out: Path, kind: str) -> list[Path]:
    """One file per scan, as per-file pipelines keep them: `npz` = np.savez of the float32 volume
    (CT-CLIP's preprocessing), `npy` = np.save of the int16 volume (our shards' bytes)."""
    from ..data import ShardIndex
    from ..data.loader import read_sample

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for path, entry in ShardIndex(root, None).entries:
        vol = read_sample(path, entry).volume
        f = out / f"{entry.key}.{kind}"
        if kind == "npz":
            np.savez(f, vol.astype(np.float32))
        else:
            np.save(f, np.ascontiguousarray(vol), allow_pickle=False)
        files.append(f)
    return files


class PerFileScans:
    """The baseline's torch Dataset: np.load one file, then the same crop, flips and window."""

    def __init__(self, files: list[Path], cfg, pad_value: float):
        self.files, self.cfg, self.pad = files, cfg, pad_value

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import torch

        from ..data.transforms import crop_pair, random_flip, sample_rng, window_into

        c, f = self.cfg, self.files[i]
        vol = np.load(f, allow_pickle=False)["arr_0"] if f.suffix == ".npz" else np.load(f, allow_pickle=False)
        rng = sample_rng(c.seed, 0, f.stem)
        v, _ = crop_pair(vol, None, c.crop, rng, self.pad)
        v, _ = random_flip(v, None, c.flip_axes, c.flip_prob, rng)
        out = torch.empty((1, *c.crop), dtype=torch.float32)
        window_into(out[0], v, c.hu_window, c.out_range)
        return out


def _baseline(files: list[Path], cfg, progress: bool, workers: int, shape) -> dict:
    from torch.utils.data import DataLoader

    from ..data.loader import worker_init

    lc = cfg.loader
    dl = DataLoader(PerFileScans(files, lc, -1024.0), batch_size=lc.batch_size, shuffle=True, drop_last=True,
                    num_workers=workers, worker_init_fn=worker_init if workers else None,
                    prefetch_factor=lc.prefetch_factor if workers else None)
    limit = cfg.bench.batches or len(dl)
    n, times = _timed(lambda: ((len(b), b) for b in dl), limit, cfg.bench.repeats, f"per-file {files[0].suffix}",
                      progress)
    return _row(n, times, shape)


def copy_ceiling_MB_per_s(shape, repeats: int = 20) -> float:
    """Same-run baseline: one core copying a stored-size int16 volume (MB of volume per second).

    Decoding an npy member is at least one such copy, so per worker this bounds decode speed.
    """
    src = np.random.default_rng(0).integers(-1000, 1000, size=shape, dtype=np.int16)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return round(src.nbytes / 1e6 / float(np.median(times)), 1)


def first_touch_MB_per_s(shape, repeats: int = 10) -> float:
    """Same-run baseline: allocate and fill a fresh float32 crop-sized buffer (page faults).
    Each loader batch lives in fresh memory, so this bounds how fast batches can be born."""
    import torch

    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        t = torch.empty(shape, dtype=torch.float32).fill_(1.0)
        times.append(time.perf_counter() - t0)
        del t
    return round(int(np.prod(shape)) * 4 / 1e6 / float(np.median(times[1:])), 1)


def _ratio(root) -> float:
    from data_shards.writer import load_manifest

    m = load_manifest(root)
    raw = m["num_samples"] * int(np.prod(m["preprocessing"]["stored_shape"])) * 2
    stored = 0
    from data_shards.tar_io import read_index

    for sh in m["shards"]:
        for e in read_index(Path(root) / sh["index"]):
            stored += e.member("vol." + m["codec"])[1]
    return round(raw / stored, 3)


def real_ct_ratios(preprocess_cfg) -> dict:
    """Compression of the real example CT after ingest to the stored grid (skipped if absent)."""
    if not REAL_CT.exists():
        return {}
    from data_shards import codecs
    from data_shards.ingest.preprocess import preprocess
    from data_shards.ingest.readers import read_nifti

    vol, _, _ = preprocess(read_nifti(REAL_CT), preprocess_cfg)
    raw = vol.nbytes
    return {c: round(raw / len(codecs.encode(vol, c)), 3) for c in codecs.CODECS}


def run(cfg, progress: bool = True, argv=None) -> dict:
    from data_shards.synth.cohort import run_synth

    rows, ratios = [], {}
    workers = max(1, cfg.loader.num_workers)
    backends = list(cfg.bench.loader_backends)
    with tempfile.TemporaryDirectory(prefix="ctvlp-bench-") as tmp:
        datasets = {}
        if cfg.bench.data:
            datasets["given"] = Path(cfg.bench.data)
        else:
            for codec in ("npy", "lz4"):
                root = Path(tmp) / codec
                c = dataclasses.replace(cfg, synth=dataclasses.replace(cfg.synth, out=str(root), patients=cfg.bench.patients),
                                        shard=dataclasses.replace(cfg.shard, codec=codec))
                run_synth(c, progress=progress)
                datasets[codec] = root
        shape = tuple(cfg.synth.shape or cfg.preprocess.stored_shape)
        ceiling = copy_ceiling_MB_per_s(shape)
        touch = first_touch_MB_per_s((cfg.loader.batch_size, 1, *cfg.loader.crop))
        kinds = [(b, t) for b in backends for t in (cfg.bench.loader_worker_types if b == "torch" else ("thread",))]
        for name, root in datasets.items():
            ratios[name] = _ratio(root)
            for backend, wtype in kinds:
                label = backend if backend == "dali" else f"torch ({ {'thread': 'threads', 'process': 'processes'}[wtype]})"
                for raw in (True, False):
                    r = _throughput(root, cfg, raw, progress, cfg.loader.num_workers, backend, wtype)
                    r["fraction_of_copy_ceiling"] = round(r["decoded_GB_per_s"] * 1e3 / (ceiling * workers), 3)
                    rows.append({"dataset": name, "backend": label, "pass": "decode only" if raw else "train transforms",
                                 "workers": cfg.loader.num_workers, **r})
        baselines = {}
        if cfg.bench.loader_baselines:
            first = next(iter(datasets.values()))
            for kind in ("npz", "npy"):
                files = write_per_file(first, Path(tmp) / f"per-file-{kind}", kind)
                b = _baseline(files, cfg, progress, cfg.loader.num_workers, shape)
                baselines[kind] = b["samples_per_s"]
                rows.append({"dataset": f"one .{kind} per scan", "backend": "torch DataLoader (baseline)",
                             "pass": "train transforms", "workers": cfg.loader.num_workers, **b})
        step = step_consumption(cfg, progress)
        for r in rows:
            if r["pass"] == "train transforms" and "baseline" not in r["backend"]:
                for kind, rate in baselines.items():
                    r[f"x_vs_per_file_{kind}"] = round(r["samples_per_s"] / rate, 2)
                if step:
                    r["x_vs_step"] = round(r["samples_per_s"] / step["scans_per_s"], 2)
                torch_rate = next((t["samples_per_s"] for t in rows if t["dataset"] == r["dataset"]
                                   and t["pass"] == r["pass"] and t["backend"].startswith("torch (")), None)
                if r["backend"] == "dali" and torch_rate:
                    r["x_vs_torch"] = round(r["samples_per_s"] / torch_rate, 2)
    goals = _goals(rows, GPU_GOALS if step else GOALS)
    payload = {"config": {"loader": dataclasses.asdict(cfg.loader), "patients": cfg.bench.patients,
                          "stored_shape": list(shape), "backends": backends},
               "training_step": step,
               "copy_ceiling_MB_per_s_per_core": ceiling, "first_touch_MB_per_s_per_core": touch,
               "throughput": rows, "goals": goals, "compression_ratio_synthetic": ratios,
               "compression_ratio_real_example_ct": real_ct_ratios(cfg.preprocess)}
    path = write_result(cfg.bench.results_dir, "loader", payload, argv)
    print(markdown_table(rows, ["dataset", "backend", "pass", "workers", "samples", "seconds", "samples_per_s",
                                "decoded_GB_per_s", "x_vs_per_file_npz", "x_vs_per_file_npy"]
                         + (["x_vs_torch", "x_vs_step"] if step else [])))
    if step:
        print(f"one training step consumes {step['scans_per_s']:.1f} scans/s (image tower fwd+bwd, {step['dtype']}, "
              f"batch {step['batch']}, crop {step['crop']})")
    print(f"baseline (same run): one core copies a stored-size volume at {ceiling} MB/s; first touch of fresh batch "
          f"memory runs at {touch} MB/s of float32 per core")
    for k, g in goals.items():
        print(f"goal {k} >= {g['goal']}: " + ", ".join(f"{n} {'met' if ok else 'NOT met'}" for n, ok in g["met"].items()))
    print(f"compression ratio (raw int16 / stored): synthetic {ratios}, real example CT "
          f"{payload['compression_ratio_real_example_ct'] or 'n/a (../shared/data absent)'}")
    print(f"wrote {path}")
    return payload
