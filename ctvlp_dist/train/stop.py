"""A graceful stop on a signal, agreed by every rank at a step boundary.

SIGUSR1 (SLURM's early warning, `--signal=B:USR1@grace`: the time limit or a preemption is near)
and SIGTERM (`scancel`) ask the run to stop. The handler only records the request; after each
optimizer step the ranks all-reduce a flag, so that every rank stops after the same step, with
no collective left waiting for a rank that has gone. They checkpoint there and end the run with
an exit code of its own: EXIT_REQUEUE for SIGUSR1 (the job script may requeue, and the requeued
job resumes with train.resume=auto), EXIT_CANCELLED for SIGTERM.

Who sees the signal: in one process or under torchrun, every rank installs the handler. Under Ray
the driver holds it and tells the workers through the run's channel actor (channel.py), which
rank 0 reads after each step before the all-reduce.
"""
from __future__ import annotations

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


class StepStop:
    """The workers' side: after each step, `agreed()` says on every rank whether to stop now.
    channel: rank 0's handle on the Ray driver's channel actor, else None (local signals only)."""

    def __init__(self, channel=None):
        self.local = StopRequest().install()
        self.channel = channel

    def agreed(self) -> Optional[str]:
        reason = self.local.reason
        if reason is None and self.channel is not None:
            import ray
            from ray.exceptions import RayError

            try:
                reason = ray.get(self.channel.stop_reason.remote())
            except RayError as e:  # the driver is gone: it can no longer ask; a local signal still works
                log.warning("the driver's channel is gone (%s): stop requests now come from signals here only",
                            type(e).__name__)
                self.channel = None
        device = torch.device("cuda", torch.cuda.current_device()) if dist.is_initialized() and \
            dist.get_backend() == "nccl" else torch.device("cpu")
        code = torch.tensor([EXIT_CODES.get(reason, 0)], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(code, op=dist.ReduceOp.MAX)  # every rank stops after the same step
        return {v: k for k, v in EXIT_CODES.items()}.get(int(code))
