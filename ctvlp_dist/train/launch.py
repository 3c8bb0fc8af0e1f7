"""Launchers of the one training loop (`loop.run_worker`):

ray    Ray Train TorchTrainer on train.workers workers; checkpoints through Ray's API; a failed
       worker group is restarted (FailureConfig) and resumes from the last checkpoint.
local  one process, here (benchmarks, debugging).
torchrun / deepspeed: `torchrun --nproc-per-node N -m ctvlp_dist.train.worker --config X.yaml`
       (or `deepspeed --module ctvlp_dist.train.worker ...`); checkpoints in out/checkpoints.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from ..config import config_to_dict
from .faults import forwarded_env
from .channel import DriverChannel
from .loop import run_worker
from .stop import StopRequest

WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def train(cfg) -> dict:
    tc = cfg.train
    if not tc.data:
        raise ValueError("train.data is empty: give a shard folder (`ctvlp synth` or `ctvlp shard` writes one)")
    if not Path(tc.data, "manifest.json").exists():
        raise FileNotFoundError(f"train.data={tc.data}: no manifest.json; is it a folder written by ctvlp shard/synth?")
    Path(tc.out).mkdir(parents=True, exist_ok=True)
    cfg = _absolute_paths(cfg)
    if tc.launcher == "ray":
        return train_ray(cfg)
    if tc.launcher == "local":
        return train_local(cfg)
    raise ValueError(f"train.launcher must be ray or local (torchrun / deepspeed: run "
                     f"`torchrun -m ctvlp_dist.train.worker ...`), got {tc.launcher!r}")


def _absolute_paths(cfg):
    """Ray workers run in their own working directories: every path they read or write is made
    absolute here, against the caller's."""
    import dataclasses

    ab = lambda p: str(Path(p).resolve()) if p else p  # noqa: E731
    tc = cfg.train
    resume = tc.resume if tc.resume in ("auto", "none") else ab(tc.resume)
    return dataclasses.replace(
        cfg, train=dataclasses.replace(tc, data=ab(tc.data), out=ab(tc.out), init_from=ab(tc.init_from), resume=resume),
        loader=dataclasses.replace(cfg.loader, labels=ab(cfg.loader.labels)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_local(cfg) -> dict:
    """One process, world size 1."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    try:
        return run_worker(config_to_dict(cfg), sink="folder")
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _ray_worker(config: dict) -> None:
    run_worker(config, sink="ray")


def train_ray(cfg) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..ray_cluster import init_ray

    tc = cfg.train
    init_ray(tc.ray_address, runtime_env={"env_vars": {**WORKER_ENV, **forwarded_env()}})
    out = Path(tc.out).resolve()
    name = "run" if tc.resume == "auto" else f"run-{time.strftime('%Y%m%dT%H%M%S')}"
    trainer = TorchTrainer(
        _ray_worker, train_loop_config=config_to_dict(cfg),
        scaling_config=ScalingConfig(num_workers=tc.workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(out / "ray"),
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=max(1, tc.keep_checkpoints))))
    # SIGUSR1 / SIGTERM: every worker stops after the same step, checkpointed; rank 0's rows and
    # summary come back through the channel, not through its files.
    channel = DriverChannel(str(out), StopRequest().install(), tc.steps, tc.progress)
    from ..observe.discovery import write_ray_targets

    # Ray's own node metrics beside the ranks', in the same discovery folder
    ray_targets = write_ray_targets(out, cfg.metrics.job or out.name) if cfg.metrics.port >= 0 else None
    try:
        result = trainer.fit()
        summary = channel.summary()
    finally:
        channel.close()
        if ray_targets is not None:
            ray_targets.unlink(missing_ok=True)
    if summary is None:
        raise RuntimeError(f"the run ended without a summary from rank 0; see {out / 'ray'} for Ray Train's logs")
    summary["ray_checkpoint"] = result.checkpoint.path if result.checkpoint else None
    return summary
