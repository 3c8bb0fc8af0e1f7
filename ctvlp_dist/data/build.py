"""`build_loader`: the one place that picks and builds a loader (`loader.backend`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


def resolve_backend(backend: str) -> tuple[str, str]:
    """loader.backend -> (backend, device). auto: DALI on a GPU host with DALI installed, else torch.
    DALI without a GPU runs CPU-only (lz4 then decodes through its CPU route)."""
    import torch

    from .dali import dali_available

    gpu = torch.cuda.is_available()
    if backend == "auto":
        backend = "dali" if gpu and dali_available() else "torch"
    if backend == "torch":
        return "torch", "cpu"
    if backend == "dali":
        return "dali", "gpu" if gpu else "cpu"
    raise ValueError(f"loader.backend must be auto, torch or dali, got {backend!r}")


def build_loader(root: str | Path, cfg, split: Optional[str] = "train", rank: int = 0, world_size: int = 1,
                 label_names: Optional[list[str]] = None, anatomies: Optional[list[str]] = None):
    """The configured loader of one split for this rank: `CTLoader` (torch) or `DALILoader`. Both
    yield `CTBatch` and share len / set_epoch / state_dict / load_state_dict."""
    backend, device = resolve_backend(cfg.backend)
    if rank == 0 and cfg.backend != backend:
        log.info("loader.backend=%s: using %s%s", cfg.backend, backend, f" on the {device}" if backend == "dali" else "")
    if backend == "dali":
        from .dali import DALILoader

        if device == "cpu" and rank == 0:  # a fallback from the GPU pipeline: said, not silent
            log.warning("loader.backend=dali without a GPU: DALI runs CPU-only (npy through fn.decoders.numpy, lz4 "
                        "through a python function around lz4.block); the torch loader is faster on CPU")
        return DALILoader(root, cfg, split=split, rank=rank, world_size=world_size, label_names=label_names,
                          anatomies=anatomies, device=device)
    from .loader import CTLoader

    return CTLoader(root, cfg, split=split, rank=rank, world_size=world_size, label_names=label_names,
                    anatomies=anatomies)
