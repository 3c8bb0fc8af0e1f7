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


class TrainMetrics:
    """What rank 0 reports per step: JSONL (every `log_every`), Prometheus gauges, a tqdm bar."""

    def __init__(self, out: Path, total_steps: int, start_step: int, world: int, flops_per_scan: int,
                 peak_flops: float, metrics_port: int = -1, metrics_addr: str = "127.0.0.1", log_every: int = 1,
                 progress: bool = True):
        self.world, self.flops_per_scan, self.peak_flops = world, flops_per_scan, peak_flops
        self.log_every = max(1, log_every)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a")
        self.port = None
        self._g = None
        if metrics_port >= 0:
            self._start_prometheus(metrics_port, metrics_addr)
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not progress,
                        dynamic_ncols=True)

    def _start_prometheus(self, port: int, addr: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        from ..prometheus import start_exporter

        reg = CollectorRegistry()
        g = {name: Gauge(f"ctvlp_train_{name}", doc, registry=reg) for name, doc in (
            ("samples_per_second", "Training samples (scan-report pairs) per second, all workers"),
            ("scans_per_second_per_worker", "Scans per second per worker"),
            ("loss", "Loss of the last step (global mean)"),
            ("lr", "Learning rate"),
            ("logit_scale", "CLIP logit scale (exp of the learned log scale)"),
            ("mfu", "Model FLOPs utilisation of the image tower (0 when the device peak is unknown)"),
            ("step", "Optimizer steps done"))}
        g["phase"] = Gauge("ctvlp_train_step_seconds", "Seconds of the last step by phase", ["phase"], registry=reg)
        g["memory"] = Gauge("ctvlp_train_memory_bytes", "Peak memory", ["kind"], registry=reg)
        g["samples"] = Counter("ctvlp_train_samples", "Training samples consumed", registry=reg)
        self._g = g
        self.port, self._server = start_exporter(reg, port, addr, "train.metrics_port")

    def record(self, step: int, epoch: int, loss: float, lr: float, logit_scale: Optional[float], samples: int,
               phases: dict) -> dict:
        """samples: global samples in this step."""
        total = sum(phases.values())
        local_scans = samples / self.world
        memory = peak_memory_bytes()
        row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "logit_scale": logit_scale, "samples": samples,
               "samples_per_s": samples / total if total else 0.0,
               "scans_per_s_per_worker": local_scans / total if total else 0.0,
               "step_s": total, **{f"{p}_s": phases[p] for p in PHASES}, **memory}
        row["mfu"] = (self.flops_per_scan * local_scans / total / self.peak_flops) if self.peak_flops and total else None
        if step % self.log_every == 0:
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
        if self._g:
            g = self._g
            g["samples_per_second"].set(row["samples_per_s"])
            g["scans_per_second_per_worker"].set(row["scans_per_s_per_worker"])
            g["loss"].set(loss)
            g["lr"].set(lr)
            g["logit_scale"].set(logit_scale or 0.0)
            g["mfu"].set(row["mfu"] or 0.0)
            g["step"].set(step)
            g["samples"].inc(samples)
            for p in PHASES:
                g["phase"].labels(p).set(phases[p])
            for kind, v in memory.items():
                g["memory"].labels(kind).set(v)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        return row

    def close(self) -> None:
        self.bar.close()
        self.jsonl.close()
        if getattr(self, "_server", None) is not None:
            self._server.shutdown()
