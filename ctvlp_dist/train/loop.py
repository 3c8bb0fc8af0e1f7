"""The training loop every launcher runs: Ray Train workers, torchrun / deepspeed processes, or
one local process. Data flows shards -> loader (build_loader: torch or DALI) -> model -> loss -> DeepSpeed engine -> metrics.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import config_from_dict, config_to_dict
from ..data import build_loader
from ..models import build_model
from ..models.export import read_exported
from ..models.flops import device_peak_tflops, image_tower_train_flops
from ..observe import Exporter
from .checkpoint import (FolderCheckpoints, RayCheckpoints, export_model, load_state, metric_totals,
                         safe_checkpoint_engine, save_state)
from .ds_config import deepspeed_config, resolve_precision
from .faults import maybe_fail
from .metrics import StepTimer, TrainMetrics
from .optim import build_optimizer
from .step import STAGES
from .channel import worker_channel
from .stop import StepStop

log = logging.getLogger(__name__)


class StepBatches:
    """Groups of `accum` loader batches, one group per optimizer step. An epoch ends after
    len(loader) // accum groups (a remainder that cannot fill a step is skipped); positions are
    the loader's own, so a checkpoint between steps resumes exactly."""

    def __init__(self, loader, accum: int):
        self.loader, self.accum = loader, accum
        self.per_epoch = len(loader) // accum
        self._it = None

    def next(self) -> list:
        if self.loader.consumed >= self.per_epoch * self.accum:
            self.close()
            self.loader.set_epoch(self.loader.epoch + 1)
        if self._it is None:
            self._it = iter(self.loader)
        return [next(self._it) for _ in range(self.accum)]

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None


def load_init(model: torch.nn.Module, path: str) -> None:
    """Start from an export (e.g. the supervised stage's). Only the classifier (a model exported
    with num_labels=0) and the organ pooling (fVLM started from a tower trained without it) may be
    absent; any other mismatch is an error."""
    sd, _, _ = read_exported(path)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shapes differ
        raise ValueError(f"train.init_from={path} does not fit this model ({str(e).splitlines()[1].strip()}); "
                         f"build it with the export's model config") from None
    if unexpected or [k for k in missing if not k.startswith(("classifier.", "organ_pool."))]:
        raise ValueError(f"train.init_from={path} does not fit this model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; build it with the export's model config")


def freeze_unused(model: torch.nn.Module, tc) -> None:
    """Parameters a stage never uses get no gradient: keep them out of the optimizer, so AdamW
    and ZeRO's gradient buckets do not sweep them every step (the supervised stage without
    text_bce leaves the text tower, its projection and the logit scale untouched). With
    lock_image the CLIP stage trains the projections and heads on a fixed image tower."""
    frozen = []
    if tc.stage == "supervised" and not tc.text_bce:
        frozen += [*model.text.parameters(), *model.text_proj.parameters(), model.logit_scale]
    if _image_locked(tc):
        frozen += list(model.image.parameters())
    if model.organ_pool is not None and tc.stage != "fvlm":
        frozen += list(model.organ_pool.parameters())
    for p in frozen:
        p.requires_grad_(False)


def _image_locked(tc) -> bool:
    return tc.stage in ("clip", "fvlm") and tc.lock_image  # the supervised stage trains nothing but the tower


def _setup_process(tc) -> None:
    torch.set_num_threads(max(1, tc.threads_per_worker))
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=tc.use_gpu)
        torch.backends.cudnn.benchmark = False


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


def set_bn_mode(module: torch.nn.Module, mode: str, lock_image: bool = False) -> None:
    if mode not in ("train", "eval"):
        raise ValueError(f"train.bn_mode must be train or eval, got {mode!r}")
    module.train()
    if mode == "eval":
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    if lock_image:
        module.image.eval()  # a locked tower keeps its BN statistics too


def _plan(cfg, loader, world: int) -> tuple[int, int, int]:
    """(micro-batches per step, steps per epoch, total steps)."""
    tc, micro = cfg.train, cfg.loader.batch_size
    gb = tc.global_batch or micro * world
    if gb % (micro * world):
        raise ValueError(f"train.global_batch={gb} must be a multiple of loader.batch_size x workers "
                         f"= {micro} x {world}")
    accum = gb // (micro * world)
    per_epoch = len(loader) // accum
    if per_epoch == 0:
        raise ValueError(f"split {tc.split!r} has {len(loader.index)} samples: too few for one step of "
                         f"{gb} samples on {world} workers; lower train.global_batch or loader.batch_size")
    return accum, per_epoch, tc.steps or tc.epochs * per_epoch


def run_worker(cfg_dict: dict, sink: str = "folder") -> dict:
    """One worker of a run (torch.distributed is initialised here unless the launcher did it).
    sink: "folder" (out/checkpoints) or "ray" (Ray Train's checkpoint API)."""
    cfg = config_from_dict(cfg_dict)
    tc = cfg.train
    if tc.stage not in STAGES:
        raise ValueError(f"train.stage must be one of {sorted(STAGES)}, got {tc.stage!r}")
    _setup_process(tc)
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if tc.use_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if tc.use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    out = Path(tc.out)
    nodes = check_shared_storage(out, rank, sink == "ray")
    # up from the start, so that Prometheus has found the rank before its first step
    exporter = Exporter(cfg.metrics, out, "train", tc.stage, rank, int(os.environ.get("LOCAL_RANK", 0)))

    _seed_all(tc.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, cfg.kernels)
    if tc.init_from:
        load_init(model, tc.init_from)
    freeze_unused(model, tc)
    tokenize = model.text.tokenize
    loader = build_loader(tc.data, dataclasses.replace(cfg.loader, last_batch="drop", train=True), split=tc.split,
                          rank=rank, world_size=world, anatomies=cfg.model.anatomies)
    accum, per_epoch, total = _plan(cfg, loader, world)
    opt, sched = build_optimizer(model, cfg.optim, total)
    engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                               config=deepspeed_config(tc, cfg.optim, cfg.loader.batch_size, accum))
    safe_checkpoint_engine(engine)
    checkpoints = RayCheckpoints() if sink == "ray" else FolderCheckpoints(out / "checkpoints", tc.keep_checkpoints)

    step, resumed_from, totals = 0, None, None
    if tc.resume != "none":
        with (checkpoints.latest() if tc.resume == "auto" else contextlib.nullcontext(_given(tc.resume))) as folder:
            if folder is not None:
                step, resumed_from = load_state(engine, folder, loader), str(folder)
                totals = metric_totals(folder, rank)
    if resumed_from is None:
        _seed_all(tc.seed * 7919 + 1 + rank)  # the runtime stream (dropout): one per rank
    elif rank == 0:
        log.info("resumed from %s at step %d", resumed_from, step)
    set_bn_mode(engine.module, tc.bn_mode, _image_locked(tc))

    channel = worker_channel(tc.out) if sink == "ray" and rank == 0 else None  # the Ray driver's line
    stopper = StepStop(channel)  # SIGUSR1 / SIGTERM from here on: a checkpointed stop
    precision = resolve_precision(tc.precision, tc.use_gpu)
    peak = (tc.peak_tflops or device_peak_tflops(precision)) * 1e12
    exporter.restore(totals)  # counters continue where the checkpoint left them
    metrics = TrainMetrics(out, total, step, world, image_tower_train_flops(cfg.model, tuple(cfg.loader.crop)), peak,
                           exporter, rank, tc.log_every, progress=tc.progress and sink != "ray")
    save = _saver(engine, checkpoints, loader, config_to_dict(cfg), metrics)
    batches = StepBatches(loader, accum)
    step_fn = functools.partial(STAGES[tc.stage], kernels=cfg.kernels)
    timer = StepTimer(cuda=tc.use_gpu)
    gb = cfg.loader.batch_size * accum * world
    t0, loss, row = time.perf_counter(), float("nan"), {}
    stopped, saved = None, None
    try:
        while step < total:
            maybe_fail(step + 1, rank, world, resumed_from is not None)
            with timer("data"):
                group = batches.next()
            loss, loss_max = mean_and_max(step_fn(engine, group, tc, timer, tokenize))
            step += 1
            phases = timer.pop()
            scale = _logit_scale(engine) if tc.stage in ("clip", "fvlm") else None
            row = metrics.record(step, loader.epoch, loss, sched.get_last_lr()[0], scale, gb, phases, loss_max,
                                 _grad_norm(engine))
            if channel is not None:
                channel.push.remote(row)
            if tc.ckpt_every and step % tc.ckpt_every == 0 and step < total:
                save(step, {"loss": loss})
                saved = step
            stopped = stopper.agreed()  # every rank, after every step: all stop after the same one
            if stopped:
                log.warning("rank %d: stopping after step %d (%s), with a checkpoint", rank, step, stopped)
                break
        if saved != step:
            save(step, {"loss": loss})
        export = None
        if tc.export and not stopped:
            export = export_model(engine, cfg, out / "model.safetensors", {"stage": tc.stage, "step": step})
    finally:
        batches.close()
        metrics.close()
        if cfg.metrics.linger_s > 0 and exporter.port is not None:
            time.sleep(cfg.metrics.linger_s)
        exporter.close()
    summary = {"stage": tc.stage, "steps": step, "total_steps": total, "steps_per_epoch": per_epoch,
               "global_batch": gb, "micro_batch": cfg.loader.batch_size, "accumulation": accum, "workers": world,
               "nodes": nodes, "zero_stage": tc.zero_stage, "precision": precision, "final_loss": loss, "resumed_from": resumed_from,
               "seconds": time.perf_counter() - t0, "export": str(export) if export else None, "last": row,
               "stopped": stopped}
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if channel is not None:
        import ray

        ray.get(channel.set_summary.remote(summary))
    return summary


def _node_key(ray_run: bool) -> str:
    if ray_run:
        import ray

        return ray.get_runtime_context().get_node_id()
    return os.environ.get("SLURMD_NODENAME") or os.uname().nodename


def check_shared_storage(out: Path, rank: int, ray_run: bool = False) -> int:
    """Every rank must see what rank 0 writes in train.out (checkpoints, the summary, the export):
    rank 0 writes a file, every rank looks for it, and all fail together with a message if one
    cannot. The number of nodes the ranks run on."""
    world = dist.get_world_size()
    name = [f".shared-check-{os.getpid()}-{time.time_ns()}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    probe = out / name[0]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("written by rank 0\n")
    dist.barrier()
    seen = [None] * world
    dist.all_gather_object(seen, (_node_key(ray_run), probe.exists()))
    dist.barrier()
    if rank == 0:
        probe.unlink()
    blind = [(r, node) for r, (node, ok) in enumerate(seen) if not ok]
    if blind:
        raise RuntimeError(f"train.out={out} is not shared storage: rank(s) {[r for r, _ in blind]} (node(s) "
                           f"{sorted({n for _, n in blind})}) do not see the file rank 0 wrote there. Put train.out "
                           "on storage that every node mounts at the same path (NFS, Lustre, GPFS, ...)")
    return len({node for node, _ in seen})


def _logit_scale(engine) -> float:
    with torch.no_grad():
        return float(engine.module("scale"))


def _saver(engine, checkpoints, loader, config: dict, metrics: TrainMetrics):
    def save(step: int, summary: dict):
        t = time.perf_counter()
        checkpoints.save(lambda folder: save_state(engine, folder, step, loader, config,
                                                   {"metrics": metrics.ex.totals()}), step, summary)
        metrics.checkpoint(time.perf_counter() - t)
    return save


def mean_and_max(loss: float) -> tuple[float, float]:
    """The mean and the largest of the ranks' losses (one all_gather of a float64 per step)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return loss, loss
    mine = torch.tensor([loss], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    values = [float(t) for t in every]
    return sum(values) / len(values), max(values)


def _grad_norm(engine):
    """DeepSpeed's global gradient norm of the last step, when it computed one."""
    g = engine.get_global_grad_norm()
    return None if g is None else float(g)


def _given(path: str) -> Path:
    """An explicit train.resume folder, checked before DeepSpeed looks inside."""
    p = Path(path)
    if not (p / "ds").is_dir():
        raise FileNotFoundError(f"train.resume={p}: not a checkpoint folder (no ds/ inside); "
                                f"give out/checkpoints/step_N, or resume=auto")
    return p
