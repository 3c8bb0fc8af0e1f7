"""Embed one split with an exported model: image and report embeddings, keys and labels."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch


def resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"{path}: no model.safetensors; give the export `ctvlp train` writes (train.out)")
    return p


def embed_loader(model, data: str, loader_cfg, split: Optional[str], labels: Optional[str], names: list[str],
                 batch_size: int):
    """Evaluation's loader: centre crops, no flips, in manifest order, repeats flagged."""
    from ..data import build_loader

    lc = dataclasses.replace(loader_cfg, train=False, shuffle=False, last_batch="pad", labels=labels,
                             batch_size=batch_size)
    return build_loader(data, lc, split=split, label_names=names, anatomies=list(getattr(model, "anatomies", [])))


def embed_batches(model, loader) -> Iterator[dict]:
    """Per batch, its real samples (padding repeats dropped): {"keys", "image" [b, d], "report"
    [b, d], "labels" [b, F] or None, "organs" [b, K, d] and "inside" (each organ's share inside
    the crop) for a model with organs, else None}, on the CPU. One batch at a time: a caller that
    writes each out holds memory bounded by the batch."""
    from ..models.anatomy import batch_organ_masks

    organs = list(getattr(model, "anatomies", []))
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    with torch.no_grad():
        for b in loader:
            keep = ~b.is_pad
            out = {"keys": [k for k, p in zip(b.key, b.is_pad.tolist()) if not p], "organs": None, "inside": None,
                   "splits": [m.get("split", "") for m, p in zip(b.meta, b.is_pad.tolist()) if not p]}
            if organs:  # one pass: the global embedding first, then the organs'
                z = model("organs", (b.volume.to(device, dtype), batch_organ_masks(b, organs, device)))[keep.to(device)]
                z = z.float().cpu()
                out.update(image=z[:, 0], organs=z[:, 1:])
                out["inside"] = [[(m.get("mask_inside") or {}).get(a) or 0.0 for a in organs]
                                 for m, p in zip(b.meta, b.is_pad.tolist()) if not p]
            else:
                out["image"] = model("image", b.volume.to(device, dtype))[keep.to(device)].float().cpu()
            out["report"] = model("text", model.text.tokenize(b.report))[keep.to(device)].float().cpu()
            out["labels"] = b.labels[keep].numpy() if b.labels is not None else None
            yield out


def embed_split(model, data: str, loader_cfg, split: str, labels: Optional[str], names: list[str],
                batch_size: int, progress: bool = True) -> dict:
    """{"keys", "image" [N, d], "report" [N, d], "labels" [N, F] or None, "organs" [N, K, d] and
    "inside" [N, K] for a model with organs, else None}; every sample exactly once."""
    from tqdm import tqdm

    loader = embed_loader(model, data, loader_cfg, split, labels, names, batch_size)
    parts = list(embed_batches(model, tqdm(loader, total=len(loader), desc=f"embed {split}", unit="batch",
                                           disable=not progress)))
    cat = lambda k: torch.cat([p[k] for p in parts]) if parts and parts[0][k] is not None else None  # noqa: E731
    ys = [p["labels"] for p in parts if p["labels"] is not None]
    return {"keys": [k for p in parts for k in p["keys"]], "image": cat("image"), "report": cat("report"),
            "labels": np.concatenate(ys) if ys else None, "organs": cat("organs"),
            "inside": np.array([r for p in parts for r in p["inside"]], dtype=np.float64)
            if parts and parts[0]["inside"] is not None else None}
