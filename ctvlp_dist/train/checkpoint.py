"""Checkpoints that resume exactly, and where they live.

One checkpoint folder holds:
  ds/                      DeepSpeed's files: module, optimizer (ZeRO partitions), lr scheduler
  rank{r}.json             step, loader position, Python and NumPy RNG states of rank r
  rank{r}.rng.safetensors  torch CPU (and CUDA) generator states of rank r
  config.json              the whole run config (rank 0)
Nothing is unpickled on load: our files are JSON and safetensors, and DeepSpeed's own files go
through torch.load(weights_only=True) with the three DeepSpeed classes they hold allowlisted.

Sinks: `FolderCheckpoints` (out/checkpoints/step_N on a shared filesystem: local, torchrun,
deepspeed launcher) and `RayCheckpoints` (each rank writes a temporary folder and
`ray.train.report` merges them into one checkpoint in Ray's storage, which is also where a
retried worker group resumes from).
"""
from __future__ import annotations

import contextlib
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

TAG = "ds"
COMPLETE = "COMPLETE"


def _ds_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_checkpoint_engine(engine) -> None:
    """Make `engine` read its checkpoints with weights_only=True."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_ds_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine = SafeTorchCheckpointEngine(engine._config)


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    py = random.getstate()
    return tensors, {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
                     "python": [py[0], list(py[1]), py[2]]}


def _set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    kind, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, state, nxt = plain["python"]
    random.setstate((v, tuple(state), nxt))


def save_state(engine, folder: Path, step: int, loader, config: dict, extra: Optional[dict] = None) -> None:
    """Collective: every rank calls it with the same folder name (its own folder under Ray).
    `extra` (e.g. the exporter's counter totals) goes into the rank's JSON."""
    from safetensors.torch import save_file

    rank = dist.get_rank()
    folder.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(folder), tag=TAG, client_state={"ctvlp_step": step})
    tensors, plain = _rng_state()
    save_file(tensors, str(folder / f"rank{rank}.rng.safetensors"))
    state = {"step": step, "world_size": dist.get_world_size(), "loader": loader.state_dict(), **plain, **(extra or {})}
    (folder / f"rank{rank}.json").write_text(json.dumps(state))
    if rank == 0:
        (folder / "config.json").write_text(json.dumps(config, indent=1))


def load_state(engine, folder: Path, loader) -> int:
    """Restore engine, loader position and RNG of this rank; returns the step to continue after."""
    from safetensors.torch import load_file

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = folder / f"rank{rank}.json"
    if not mine.exists():
        raise FileNotFoundError(f"{folder}: no state for rank {rank}; was it written by another number of "
                                f"workers? (this run has {world})")
    state = json.loads(mine.read_text())
    if state["world_size"] != world:
        raise ValueError(f"{folder} was written by {state['world_size']} workers, this run has {world}: "
                         f"exact resume needs the same number (or start anew with train.resume=none)")
    path, client = engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{folder}: DeepSpeed found no checkpoint under tag {TAG!r}")
    if client.get("ctvlp_step") != state["step"]:
        raise ValueError(f"{folder}: DeepSpeed state is at step {client.get('ctvlp_step')}, rank files at "
                         f"{state['step']}: a mixed or partial checkpoint")
    loader.load_state_dict(state["loader"])
    _set_rng_state(load_file(str(folder / f"rank{rank}.rng.safetensors")), state)
    return int(state["step"])


def metric_totals(folder: Path, rank: int) -> Optional[dict]:
    """The counter totals a rank saved with the checkpoint (none in checkpoints from before them)."""
    return json.loads((Path(folder) / f"rank{rank}.json").read_text()).get("metrics")


class FolderCheckpoints:
    """out/checkpoints/step_000123/, on a filesystem every rank sees. A checkpoint counts once rank
    0 has marked it COMPLETE after all ranks wrote; older ones beyond `keep` are pruned."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / COMPLETE).exists())

    @contextlib.contextmanager
    def latest(self) -> Iterator[Optional[Path]]:
        done = self._complete()
        yield done[-1] if done else None

    def save(self, write, step: int, metrics: dict) -> Path:
        folder = self.root / f"step_{step:08d}"
        write(folder)
        dist.barrier()
        if dist.get_rank() == 0:
            (folder / COMPLETE).write_text(json.dumps(metrics))
            for old in self._complete()[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return folder


class RayCheckpoints:
    """Checkpoints through Ray Train's API: reported by every worker, merged by Ray."""

    @contextlib.contextmanager
    def latest(self) -> Iterator[Optional[Path]]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def save(self, write, step: int, metrics: dict) -> None:
        import ray.train
        from ray.train import Checkpoint

        tmp = Path(tempfile.mkdtemp(prefix=f"ctvlp-ckpt-{step}-"))
        try:
            write(tmp)
            ray.train.report({**metrics, "step": step}, checkpoint=Checkpoint.from_directory(str(tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def export_model(engine, cfg, path: Path, extra: dict) -> Optional[Path]:
    """Collective: gathers ZeRO-3 partitions on every rank; rank 0 writes the safetensors export."""
    import deepspeed

    from ..models.export import save_exported

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        sd = {k: v.detach().clone().cpu() for k, v in module.state_dict().items()} if dist.get_rank() == 0 else None
    if dist.get_rank() == 0:
        return save_exported(sd, cfg.model, path, extra)
    return None
