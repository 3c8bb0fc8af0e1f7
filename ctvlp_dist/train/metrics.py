"""Step metrics: a phase timer, and rank 0's outputs of them (Prometheus, JSONL, progress bar).

Phases of a step: data (waiting on the loader), forward, backward, optimizer. With GradCache the
no-grad first pass and the loss count as forward; each micro-batch's re-run forward as forward,
its backward as backward. On GPU the timer synchronises at phase edges, so phases are true
device times (at the cost of the overlap a real run would have between them).
"""
from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

PHASES = ("data", "forward", "backward", "optimizer")


class StepTimer:
    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.seconds: dict = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - t

    def pop(self) -> dict:
        out = {p: self.seconds.get(p, 0.0) for p in PHASES}
        self.seconds.clear()
        return out


def peak_memory_bytes() -> dict:
    """Peak host RSS of this process, and peak CUDA memory allocated when on GPU."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = {"host_peak_rss": rss}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
    return out


def allocator_stats(memory: dict) -> dict:
    """torchtitan's memory figures: peak active and reserved bytes, allocation retries, OOMs (the
    CUDA caching allocator's); on CPU the peaks are the host's peak RSS and the counts 0."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st = torch.cuda.memory_stats()
        return {"max_active": st.get("active_bytes.all.peak", 0), "max_reserved": st.get("reserved_bytes.all.peak", 0),
                "alloc_retries": st.get("num_alloc_retries", 0), "ooms": st.get("num_ooms", 0)}
    rss = memory["host_peak_rss"]
    return {"max_active": rss, "max_reserved": rss, "alloc_retries": 0, "ooms": 0}


class TrainMetrics:
    """What each rank reports per step: its exporter's metrics (observe/catalog.py) on every rank;
    on rank 0 also the JSONL rows (every `log_every`) and the progress bar."""

    def __init__(self, out: Path, total_steps: int, start_step: int, world: int, flops_per_scan: int,
                 peak_flops: float, exporter, rank: int = 0, log_every: int = 1, progress: bool = True):
        self.world, self.flops_per_scan, self.peak_flops = world, flops_per_scan, peak_flops
        self.ex, self.rank, self.log_every = exporter, rank, max(1, log_every)
        self.jsonl = self.bar = None
        self._allocator = {"alloc_retries": 0, "ooms": 0}
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(out / "metrics.jsonl", "a")
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not progress,
                            dynamic_ncols=True)

    @property
    def port(self):
        return self.ex.port

    def record(self, step: int, epoch: int, loss: float, lr: float, logit_scale: Optional[float], samples: int,
               phases: dict, loss_max: Optional[float] = None, grad_norm: Optional[float] = None) -> dict:
        """samples: global samples in this step; loss: the mean over ranks, loss_max: the largest."""
        total = sum(phases.values())
        local_scans = samples / self.world
        memory = peak_memory_bytes()
        row = {"step": step, "epoch": epoch, "loss": loss, "loss_max": loss if loss_max is None else loss_max,
               "grad_norm": grad_norm, "lr": lr, "logit_scale": logit_scale, "samples": samples,
               "samples_per_s": samples / total if total else 0.0,
               "scans_per_s_per_worker": local_scans / total if total else 0.0,
               "step_s": total, **{f"{p}_s": phases[p] for p in PHASES}, **memory}
        tflops = self.flops_per_scan * local_scans / total / 1e12 if total else 0.0
        row["mfu"] = (tflops * 1e12 / self.peak_flops) if self.peak_flops and total else None
        self._export(row, local_scans, tflops, memory)
        if self.jsonl is not None:
            if step % self.log_every == 0:
                self.jsonl.write(json.dumps(row) + "\n")
                self.jsonl.flush()
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        return row

    def _export(self, row: dict, local_scans: float, tflops: float, memory: dict) -> None:
        m = self.ex.m
        for name, key in (("loss", "loss"), ("loss_max", "loss_max"), ("lr", "lr"), ("samples_per_second", "samples_per_s"),
                          ("scans_per_second_per_worker", "scans_per_s_per_worker")):
            m[f"ctvlp_train_{name}"].set(row[key])
        m["ctvlp_train_grad_norm"].set(float("nan") if row["grad_norm"] is None else row["grad_norm"])
        m["ctvlp_train_logit_scale"].set(row["logit_scale"] or 0.0)
        m["ctvlp_train_mfu"].set(row["mfu"] or 0.0)
        m["ctvlp_train_tflops"].set(tflops)
        m["ctvlp_train_steps_total"].inc()
        m["ctvlp_train_samples_total"].inc(local_scans)
        m["ctvlp_loader_samples_total"].inc(local_scans)
        m["ctvlp_loader_wait_seconds_total"].inc(row["data_s"])
        m["ctvlp_train_data_wait_ratio"].set(row["data_s"] / row["step_s"] if row["step_s"] else 0.0)
        for p in PHASES:
            m["ctvlp_train_step_seconds"].labels(p).set(row[f"{p}_s"])
        alloc = allocator_stats(memory)
        m["ctvlp_train_memory_max_active_bytes"].set(alloc["max_active"])
        m["ctvlp_train_memory_max_reserved_bytes"].set(alloc["max_reserved"])
        for k in ("alloc_retries", "ooms"):  # the allocator counts since the process began
            m[f"ctvlp_train_{k}_total"].inc(max(0, alloc[k] - self._allocator[k]))
            self._allocator[k] = alloc[k]

    def checkpoint(self, seconds: float) -> None:
        self.ex.m["ctvlp_train_checkpoints_total"].inc()
        self.ex.m["ctvlp_train_checkpoint_seconds_total"].inc(seconds)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.jsonl.close()
