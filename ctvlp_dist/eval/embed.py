"""Embed one split with an exported model: image and report embeddings, keys and labels."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"{path}: no model.safetensors; give the export `ctvlp train` writes (train.out)")
    return p


def embed_split(model, data: str, loader_cfg, split: str, labels: Optional[str], names: list[str],
                batch_size: int, progress: bool = True) -> dict:
    """{"keys", "image" [N, d], "report" [N, d], "labels" [N, F] or None, "organs" [N, K, d] and
    "inside" [N, K] (each organ's share inside the crop) for a model with organs, else None};
    centre crops, no flips, every sample exactly once (padding repeats are dropped)."""
    from tqdm import tqdm

    from ..data import build_loader
    from ..models.anatomy import batch_organ_masks

    lc = dataclasses.replace(loader_cfg, train=False, shuffle=False, last_batch="pad", labels=labels,
                             batch_size=batch_size)
    organs = list(getattr(model, "anatomies", []))
    loader = build_loader(data, lc, split=split, label_names=names, anatomies=organs)
    keys, zi, zt, ys, zo, inside = [], [], [], [], [], []
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    with torch.no_grad():
        for b in tqdm(loader, total=len(loader), desc=f"embed {split}", unit="batch", disable=not progress):
            keep = ~b.is_pad
            keys += [k for k, p in zip(b.key, b.is_pad.tolist()) if not p]
            if organs:  # one pass: the global embedding first, then the organs'
                z = model("organs", (b.volume.to(device, dtype), batch_organ_masks(b, organs, device)))[keep.to(device)]
                z = z.float().cpu()
                zi.append(z[:, 0])
                zo.append(z[:, 1:])
                inside += [[(m.get("mask_inside") or {}).get(a) or 0.0 for a in organs]
                           for m, p in zip(b.meta, b.is_pad.tolist()) if not p]
            else:
                zi.append(model("image", b.volume.to(device, dtype))[keep.to(device)].float().cpu())
            tok = model.text.tokenize(b.report)
            zt.append(model("text", tok)[keep.to(device)].float().cpu())
            if b.labels is not None:
                ys.append(b.labels[keep].numpy())
    return {"keys": keys, "image": torch.cat(zi), "report": torch.cat(zt),
            "labels": np.concatenate(ys) if ys else None, "organs": torch.cat(zo) if zo else None,
            "inside": np.array(inside, dtype=np.float64) if organs else None}
