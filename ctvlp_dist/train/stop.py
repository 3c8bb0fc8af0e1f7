"""A graceful stop on a signal, agreed by every rank at a step boundary.

SIGUSR1 (SLURM's early warning, `--signal=B:USR1@grace`: the time limit or a preemption is near)
and SIGTERM (`scancel`) ask the run to stop. The handler only records the request; after each
optimizer step the ranks all-reduce a flag, so that every rank stops after the same step, with
no collective left waiting for a rank that has gone. They checkpoint there and end the run with
an exit code of its own: EXIT_REQUEUE for SIGUSR1 (the job script may requeue, and the requeued
job resumes with train.resume=auto), EXIT_CANCELLED for SIGTERM.

Who sees the signal: in one process or under torchrun, every rank installs the handler. Under Ray
the driver holds it and tells the workers through a named Ray actor (one per run folder), which
rank 0 reads after each step before the all-reduce.
"""
from __future__ import annotations

import hashlib
import logging
import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped early, resume me
EXIT_CANCELLED = 76
REASONS = {signal.SIGUSR1: "requeue", signal.SIGTERM: "cancelled"}
EXIT_CODES = {"requeue": EXIT_REQUEUE, "cancelled": EXIT_CANCELLED}


class StopRequest:
    """The request of this process: set by the signal handler, read by the step loop."""

    def __init__(self):
        self.reason: Optional[str] = None
        self._on_request = []

    def install(self, on_request=None) -> "StopRequest":
        """Handle SIGUSR1 and SIGTERM here (main thread only; elsewhere a no-op)."""
        if on_request is not None:
            self._on_request.append(on_request)
        if threading.current_thread() is threading.main_thread():
            for sig in REASONS:
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.reason is None:
            self.reason = REASONS[signum]
            log.warning("%s received: stopping at the next step boundary with a checkpoint (%s)",
                        signal.Signals(signum).name, self.reason)
            for fn in self._on_request:
                fn(self.reason)


def actor_name(out: str) -> str:
    """The run's stop actor: one per run folder, so two runs on one cluster do not mix."""
    return "ctvlp-stop-" + hashlib.sha256(str(out).encode()).hexdigest()[:16]


class _StopFlag:
    def __init__(self):
        self.reason = None

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason

    def get(self) -> Optional[str]:
        return self.reason


class DriverStop:
    """The driver's side under Ray: its signal handler records the request, and a watcher thread
    (not the handler: Ray calls do not belong in one) passes it to the run's named actor, which
    the workers read. A fresh actor per driver, so that a requeued run starts unstopped."""

    def __init__(self, out: str):
        import ray

        name = actor_name(out)
        try:
            ray.kill(ray.get_actor(name))  # a previous driver's, if it outlived it
        except ValueError:
            pass
        self.actor = ray.remote(num_cpus=0)(_StopFlag).options(name=name).remote()
        self.request = StopRequest().install()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.2):
            if self.request.reason is not None:
                self.actor.set.remote(self.request.reason)
                return

    def close(self) -> None:
        import ray

        self._done.set()
        self._thread.join()
        ray.kill(self.actor)


class StepStop:
    """The workers' side: after each step, `agreed()` says on every rank whether to stop now."""

    def __init__(self, out: str, ray_run: bool):
        self.local = StopRequest().install()
        self.actor = None
        if ray_run and dist.get_rank() == 0:
            import ray

            try:
                self.actor = ray.get_actor(actor_name(out))
            except ValueError:  # no driver flag (a driver that installs none): local signals only
                self.actor = None

    def agreed(self) -> Optional[str]:
        reason = self.local.reason
        if reason is None and self.actor is not None:
            import ray

            reason = ray.get(self.actor.get.remote())
        device = torch.device("cuda", torch.cuda.current_device()) if dist.is_initialized() and \
            dist.get_backend() == "nccl" else torch.device("cpu")
        code = torch.tensor([EXIT_CODES.get(reason, 0)], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(code, op=dist.ReduceOp.MAX)  # every rank stops after the same step
        return {v: k for k, v in EXIT_CODES.items()}.get(int(code))
