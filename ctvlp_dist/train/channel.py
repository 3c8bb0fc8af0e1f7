"""The Ray driver's line to its workers, one named actor per run folder: the stop request goes
down (stop.py), rank 0's step rows and final summary come up. So the driver, which may sit on
another node than rank 0, reads nothing from rank 0's files.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Optional


def channel_name(out: str) -> str:
    """One per run folder, so that two runs on one cluster do not mix."""
    return "ctvlp-run-" + hashlib.sha256(str(out).encode()).hexdigest()[:16]


class RunChannel:
    """The actor. It holds only the rows the driver has not taken yet (the record of every step is
    rank 0's metrics.jsonl)."""

    def __init__(self):
        self.stop: Optional[str] = None
        self.rows: list[dict] = []
        self.result: Optional[dict] = None

    def request_stop(self, reason: str) -> None:
        self.stop = self.stop or reason

    def stop_reason(self) -> Optional[str]:
        return self.stop

    def push(self, row: dict) -> None:
        self.rows.append(row)

    def take_rows(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows

    def set_summary(self, summary: dict) -> None:
        self.result = summary

    def summary(self) -> Optional[dict]:
        return self.result


def worker_channel(out: str):
    """Rank 0's handle on its driver's channel, or None (a driver that created none)."""
    import ray

    try:
        return ray.get_actor(channel_name(out))
    except ValueError:
        return None


class DriverChannel:
    """The driver's side: a fresh actor per driver (a requeued run starts unstopped); a thread
    relays this process's stop request (set by a signal handler, where Ray calls do not belong)
    and feeds the progress bar from rank 0's rows."""

    def __init__(self, out: str, request, total_steps: int, progress: bool):
        import ray

        name = channel_name(out)
        try:
            ray.kill(ray.get_actor(name))  # a previous driver's, if it outlived it
        except ValueError:
            pass
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node: it lives and dies with the driver, not with a worker node that is lost
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = ray.remote(num_cpus=0)(RunChannel).options(name=name, scheduling_strategy=here).remote()
        self.request, self.total, self.progress = request, total_steps, progress
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import ray
        from tqdm import tqdm

        bar = tqdm(total=self.total or None, desc="train", unit="step", disable=not self.progress, dynamic_ncols=True)
        relayed = False
        while not self._done.wait(0.5):
            if self.request.reason is not None and not relayed:
                self.actor.request_stop.remote(self.request.reason)
                relayed = True
            for row in ray.get(self.actor.take_rows.remote()):
                bar.n = row["step"]
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", refresh=False)
                bar.refresh()
        bar.close()

    def summary(self) -> Optional[dict]:
        import ray

        return ray.get(self.actor.summary.remote())

    def close(self) -> None:
        import ray

        self._done.set()
        self._thread.join()
        ray.kill(self.actor)
