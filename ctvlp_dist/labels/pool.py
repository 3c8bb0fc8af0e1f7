"""A pool of vLLM engine actors under Ray that loses nothing when a worker dies.

Why Ray actors holding `vllm.LLM` rather than `ray.data.llm`: the driver keeps every batch
until its result arrives, so a batch whose worker died is resubmitted (each report is
labelled exactly once), resume works per key, and the yes/no scoring post-processes logprobs
in the engine that computed them. `ray.data.llm` hides batches inside a dataset pipeline,
and its `ray[llm]` extra pins a GPU build of vLLM.

Actors restart after a crash (`max_restarts`); a batch is retried up to that many times,
then its reports are recorded as failed with the reason. Nothing is dropped.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Callable

from ..ray_cluster import init_ray

log = logging.getLogger(__name__)


def engine_count(nodes: list[dict], tensor_parallel_size: int, threads_per_engine: int, gpu: bool) -> int:
    """label.engines=0 fills the cluster: on each alive node, one engine per tensor_parallel_size
    GPUs (an engine never spans nodes: leftover GPUs of a node stay idle), or on CPU one per
    threads_per_engine CPUs."""
    per = max(1, tensor_parallel_size if gpu else threads_per_engine)
    kind = "GPU" if gpu else "CPU"
    total = sum(int(n.get("Resources", {}).get(kind, 0)) // per for n in nodes if n.get("Alive"))
    if total == 0:
        raise ValueError(f"label.engines=0 found no node with {per} {kind}s for one engine; lower "
                         f"label.{'tensor_parallel_size' if gpu else 'threads_per_engine'} or set label.engines")
    return total


def run_pool(batches: list[list[tuple[str, str]]], *, model: str, cfg, gpu: bool,
             on_rows: Callable[[list[dict]], None], acct=None, task: str = "label") -> int:
    """Label (or, task="split", split) every batch; the number of engines it ran. `acct` (an
    Accounting) hears of restarts, retries, the queue's depth and each engine's vLLM statistics."""
    import ray
    from ray.exceptions import RayActorError

    from .vllm_engine import CPU_ENV, LabelEngine

    init_ray()
    ray_targets = None
    if acct is not None and acct.ex is not None and acct.ex.port is not None:  # Ray's node metrics beside ours
        from ..observe.discovery import write_ray_targets

        ray_targets = write_ray_targets(acct.ex.run, acct.ex.job)
    env = {} if gpu else {**CPU_ENV, "OMP_NUM_THREADS": str(cfg.threads_per_engine)}
    opts = dict(max_restarts=cfg.max_worker_restarts, max_task_retries=0, runtime_env={"env_vars": env})
    opts.update({"num_gpus": cfg.tensor_parallel_size, "num_cpus": 1} if gpu else {"num_cpus": cfg.threads_per_engine})
    Actor = ray.remote(**opts)(LabelEngine)
    actors = [Actor.remote(model, cfg.label_set, cfg.scoring, max_model_len=cfg.max_model_len,
                           max_tokens=cfg.max_tokens, retries=cfg.retries, tensor_parallel_size=cfg.tensor_parallel_size,
                           dtype=cfg.dtype, seed=cfg.seed, load_format=cfg.load_format, task=task,
                           anatomy_map=cfg.anatomy_map)
              for _ in range(cfg.engines or engine_count(ray.nodes(), cfg.tensor_parallel_size, cfg.threads_per_engine,
                                                         gpu))]
    queue = deque((b, 0) for b in batches)
    inflight: dict = {}
    incarnation = [0] * len(actors)  # bumped when a worker is known dead and has come back
    dead: set[int] = set()

    def fail(batch, tries, reason):
        on_rows([{"key": k, "probs": {}, "raw": "", "tokens_in": 0, "tokens_out": 0, "attempts": tries,
                  "status": f"failed: {reason}"} for k, _ in batch])

    def submit(i: int) -> None:
        alive = [j for j in range(len(actors)) if j not in dead]
        if not queue or not alive:
            return
        i = i if i not in dead else alive[0]
        batch, tries = queue.popleft()
        inflight[actors[i].work.remote(batch)] = (i, batch, tries, incarnation[i])
        if acct is not None:
            acct.queue(len(queue))

    for i in range(len(actors)):
        for _ in range(2):  # two batches per engine keep it busy while the driver writes results
            submit(i)
    try:
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            i, batch, tries, inc = inflight.pop(ref)
            try:
                done = ray.get(ref)
                rows = done["rows"]
                if acct is not None:
                    acct.engine_stats(i, done["stats"])
                for r in rows:  # resubmissions after a worker death count as attempts too
                    r["attempts"] = int(r.get("attempts", 1)) + tries
                on_rows(rows)
            except RayActorError as e:
                if inc == incarnation[i]:  # first news of this worker's death: wait for its restart
                    if acct is not None:
                        acct.restart()
                    incarnation[i] += 1
                    log.warning("engine worker %d died (%s); waiting for Ray to restart it", i, type(e).__name__)
                    if not _wait_ready(actors[i]):
                        dead.add(i)
                if tries + 1 > cfg.max_worker_restarts:
                    fail(batch, tries + 1, f"engine worker died {tries + 1} times while labelling this batch")
                else:
                    queue.appendleft((batch, tries + 1))
                    if acct is not None:
                        acct.retry()
            submit(i)
            if not inflight and queue and len(dead) == len(actors):
                while queue:
                    fail(*queue.popleft(), "every engine worker is dead (restarts exhausted)")
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        if ray_targets is not None:
            ray_targets.unlink(missing_ok=True)
    return len(actors)


def _wait_ready(actor, timeout: float = 900.0) -> bool:
    """Block until a restarting actor answers again (True) or is dead for good (False)."""
    import time

    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.pid.remote(), timeout=60)
            return True
        except (ActorUnavailableError, GetTimeoutError):
            time.sleep(1.0)
        except ActorDiedError:
            return False
    return False
