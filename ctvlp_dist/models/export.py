"""Exported weights: one safetensors file holding the state dict and, in its metadata, the model
config. Loading needs neither DeepSpeed nor pickle."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from ..config.schema import ModelConfig

META_KEY = "ctvlp_model_config"


def save_exported(state_dict: dict, cfg: ModelConfig, path: str | Path, extra: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {"format": "pt", META_KEY: json.dumps(dataclasses.asdict(cfg)), "ctvlp": json.dumps(extra or {})}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)  # never a half-written export
    return path


def read_exported(path: str | Path) -> tuple[dict, ModelConfig, dict]:
    """(state dict, model config, extra metadata) of an export."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if META_KEY not in meta:
            raise ValueError(f"{path}: not a ctvlp export (no {META_KEY} metadata); export one with `ctvlp train`")
        sd = {k: f.get_tensor(k) for k in f.keys()}
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(meta[META_KEY]).items()})
    return sd, cfg, json.loads(meta.get("ctvlp", "{}"))


def load_exported(path: str | Path, dtype: Optional[torch.dtype] = None, conv_impl: Optional[str] = None):
    """An exported model as a plain CTCLIP (eval mode); the text tower's architecture and tokenizer
    come from model.text_model, its weights from the export. `conv_impl` overrides the export's
    (triton: in eval mode the Triton kernels run BatchNorm folded into the convolutions)."""
    import dataclasses

    from .clip import CTCLIP

    sd, cfg, _ = read_exported(path)
    if conv_impl is not None:
        cfg = dataclasses.replace(cfg, conv_impl=conv_impl)
    model = CTCLIP(cfg)
    model.load_state_dict(sd, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
