"""`ctvlp bench train`: what one worker of the training engine does per second, and why.

1. tower: forward + backward of the image tower alone at the crop (bf16 on GPU, fp32 on CPU),
   scans/s, peak memory and MFU on the counted FLOPs (models/flops.py).
2. gradcache: time per scan of a GradCache step (micro-batches of bench.train_micro) over a
   plain step of the same batch, both towers and the loss; theory ~4/3 (one extra forward on
   top of forward + backward = 3 forward units). On GPU with bench.train_max_batch, the
   GradCache batch doubles until the device runs out of memory.
3. loop: the real engine (DeepSpeed, one local worker) on a synthetic cohort: the step-time
   breakdown (data wait, forward, backward, optimizer), medians after the first step.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

from ..records import markdown_table, write_result


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, reps: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _peak_reset(device):
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device):
    import torch

    from ..train.metrics import peak_memory_bytes

    return torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_memory_bytes()["host_peak_rss"]


def bench_tower(cfg, crop, batch, device, dtype, reps) -> dict:
    import torch

    from ..models.flops import device_peak_tflops, image_tower_train_flops
    from ..models.resnet3d import ResNet3d18

    m = cfg.model
    tower = ResNet3d18(m.stem, m.norm, m.gn_groups, m.channels_last, m.conv_impl, m.width).to(device, dtype).train()
    x = torch.randn(batch, 1, *crop, device=device, dtype=dtype)

    def step():
        tower.zero_grad(set_to_none=True)
        tower(x).float().square().mean().backward()

    _peak_reset(device)
    t = _timed(step, device, reps)
    flops = image_tower_train_flops(m, crop)
    prec = "bf16" if dtype == torch.bfloat16 else "fp32"
    peak = device_peak_tflops(prec)
    achieved = flops * batch / t
    return {"batch": batch, "seconds_per_step": t, "scans_per_s": batch / t, "tflops_per_scan": flops / 1e12,
            "achieved_tflops": achieved / 1e12, "peak_tflops": peak or None,
            "mfu": achieved / (peak * 1e12) if peak else None, "peak_memory_bytes": _peak(device),
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None}


def _clip_model(cfg, device, dtype):
    from ..models import CTCLIP

    model = CTCLIP(cfg.model).to(device, dtype).train()
    model.text.eval()  # dropout off: both steps do the same arithmetic
    return model


def _clip_inputs(model, n, crop, device, dtype):
    import torch

    vol = torch.randn(n, 1, *crop, device=device, dtype=dtype)
    tok = model.text.tokenize([f"report {i}: no acute findings, {i % 7} mm nodule." for i in range(n)], device)
    return vol, tok


def _gradcache_step(model, vol, tok, micro):
    from ..loss import clip_loss
    from ..train.gradcache import gradcache_step

    n = vol.shape[0]
    parts = [slice(i, i + micro) for i in range(0, n, micro)]
    return gradcache_step(lambda v: model("image", v), lambda t: model("text", t), [vol[s] for s in parts],
                          [{k: v[s] for k, v in tok.items()} for s in parts],
                          lambda zi, zt: clip_loss(zi, zt, model("scale")), modules=[model])


def bench_gradcache(cfg, crop, batch, micro, device, dtype, reps) -> dict:
    from ..loss import clip_loss

    model = _clip_model(cfg, device, dtype)
    vol, tok = _clip_inputs(model, batch, crop, device, dtype)

    def plain():
        model.zero_grad(set_to_none=True)
        zi, zt = model("image", vol), model("text", tok)
        clip_loss(zi.float(), zt.float(), model("scale")).backward()

    def cached():
        model.zero_grad(set_to_none=True)
        _gradcache_step(model, vol, tok, micro)

    _peak_reset(device)
    tp = _timed(plain, device, reps)
    mem_plain = _peak(device)
    _peak_reset(device)
    tg = _timed(cached, device, reps)
    return {"batch": batch, "micro": micro, "plain_s_per_scan": tp / batch, "gradcache_s_per_scan": tg / batch,
            "ratio": tg / tp, "theory": 4 / 3, "plain_peak_memory_bytes": mem_plain,
            "gradcache_peak_memory_bytes": _peak(device)}


def max_gradcache_batch(cfg, crop, micro, device, dtype, start: int, limit: int = 1 << 17) -> dict:
    """Double the GradCache batch until CUDA runs out of memory (or `limit`): the largest that ran."""
    import torch

    model = _clip_model(cfg, device, dtype)
    best, n, t = None, start, None
    while n <= limit:
        try:
            vol, tok = _clip_inputs(model, n, crop, device, dtype)
            model.zero_grad(set_to_none=True)
            _sync(device)
            t0 = time.perf_counter()
            _gradcache_step(model, vol, tok, micro)
            _sync(device)
            best, t = n, time.perf_counter() - t0
            del vol, tok
        except torch.cuda.OutOfMemoryError:
            break
        n *= 2
    torch.cuda.empty_cache()
    return {"largest_batch": best, "seconds_per_step": t, "s_per_scan": t / best if best else None,
            "stopped_by": "limit" if n > limit else "out of memory"}


def bench_loop(cfg, crop, steps, progress) -> dict:
    from data_shards.synth.cohort import run_synth

    from ..train.launch import train_local

    with tempfile.TemporaryDirectory(prefix="ctvlp-bench-train-") as tmp:
        data = Path(tmp) / "data"
        shape = tuple(c + 8 for c in crop)
        micro = cfg.loader.batch_size
        run_cfg = dataclasses.replace(cfg, synth=dataclasses.replace(cfg.synth, patients=max(8, 2 * micro * 2),
                                                                     out=str(data), shape=shape, workers=1))
        run_synth(run_cfg, progress=progress)
        run_cfg.loader = dataclasses.replace(cfg.loader, crop=tuple(crop), num_workers=min(2, cfg.loader.num_workers))
        run_cfg.train = dataclasses.replace(cfg.train, data=str(data), out=str(Path(tmp) / "run"), stage="clip",
                                            steps=steps, global_batch=0, launcher="local", ckpt_every=0,
                                            export=False, progress=progress, resume="none",
                                            use_gpu=cfg.train.use_gpu, init_from=None)
        summary = train_local(run_cfg)
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    keys = ("step_s", "data_s", "forward_s", "backward_s", "optimizer_s", "scans_per_s_per_worker", "mfu")
    med = {k: statistics.median([r[k] for r in rows]) if rows and rows[0][k] is not None else None for k in keys}
    return {"steps_timed": len(rows), "micro_batch": summary["micro_batch"], "zero_stage": summary["zero_stage"],
            "precision": summary["precision"], **med, "peak_memory_bytes": max(r.get("cuda_peak_allocated",
                                                                                     r["host_peak_rss"]) for r in rows)}


def run(cfg, progress: bool = True, argv=None) -> dict:
    import torch

    b = cfg.bench
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    crop = tuple(b.train_crop or (cfg.loader.crop if gpu else (32, 64, 64)))
    batch = cfg.loader.batch_size
    cfg.train = dataclasses.replace(cfg.train, use_gpu=gpu, precision="auto")
    reps = 5 if gpu else 2
    out = {"crop": list(crop), "stem": cfg.model.stem, "norm": cfg.model.norm, "dtype": str(dtype).split(".")[-1]}
    out["tower"] = bench_tower(cfg, crop, batch, device, dtype, reps)
    out["gradcache"] = bench_gradcache(cfg, crop, max(batch, 2 * b.train_micro), b.train_micro, device, dtype, reps)
    if gpu and b.train_max_batch:
        out["gradcache_max"] = max_gradcache_batch(cfg, crop, b.train_micro, device, dtype, start=64)
    try:
        import deepspeed  # noqa: F401  (the lent GPU image may lack it: the tower numbers still stand)
        out["loop"] = bench_loop(cfg, crop, b.train_steps, progress)
    except ImportError as e:
        out["loop"] = {"skipped": f"{e}; install deepspeed for the engine breakdown"}
    path = write_result(b.results_dir, "train", out, argv)
    t, g, lp = out["tower"], out["gradcache"], out["loop"]
    if "skipped" in lp:
        lp = {k: float("nan") for k in ("data_s", "forward_s", "backward_s", "optimizer_s", "scans_per_s_per_worker",
                                        "peak_memory_bytes")} | {"mfu": None}
    rows = [{"part": "image tower fwd+bwd", "scans/s": f"{t['scans_per_s']:.3g}", "TFLOP/s": f"{t['achieved_tflops']:.3g}",
             "MFU": f"{t['mfu']:.1%}" if t["mfu"] else "n/a (CPU)", "peak mem GB": f"{t['peak_memory_bytes'] / 1e9:.2f}"},
            {"part": f"GradCache/plain time per scan (micro {g['micro']}, batch {g['batch']})", "scans/s": "",
             "TFLOP/s": "", "MFU": f"ratio {g['ratio']:.2f} (theory 1.33)", "peak mem GB": ""},
            {"part": f"engine step (data {lp['data_s']:.3f} s, fwd {lp['forward_s']:.3f}, bwd {lp['backward_s']:.3f}, "
                     f"opt {lp['optimizer_s']:.3f})", "scans/s": f"{lp['scans_per_s_per_worker']:.3g}", "TFLOP/s": "",
             "MFU": f"{lp['mfu']:.1%}" if lp["mfu"] else "n/a", "peak mem GB": f"{lp['peak_memory_bytes'] / 1e9:.2f}"}]
    print(markdown_table(rows, ["part", "scans/s", "TFLOP/s", "MFU", "peak mem GB"]))
    print(f"result: {path}")
    return out
