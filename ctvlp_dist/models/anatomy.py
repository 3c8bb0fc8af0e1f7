"""fVLM's per-anatomy pooling on the 3D ResNet: one embedding per organ.

Each organ's mask is max-pooled to the feature grids of layers 2, 3 and 4 (a position belongs
to the organ when any of its voxels does). Each layer's positions are projected to a common
width and concatenated along the token axis; one learned query per organ attends, through one
shared multi-head attention, over its organ's positions only (a per-sample, per-organ key
mask), and a projection per organ follows. It runs batched: the organs are the attention's
query axis, so keys and values are computed once per sample. An organ with no position
attends over all of them, so that its output stays finite; the loss masks it out.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def organ_masks(anatomy: torch.Tensor, values: list[int]) -> torch.Tensor:
    """uint8 label map [B, 1, D, H, W] -> bool [B, K, D, H, W], one channel per organ's value."""
    v = torch.as_tensor(values, dtype=anatomy.dtype, device=anatomy.device).view(1, -1, 1, 1, 1)
    return anatomy == v


def batch_organ_masks(batch, anatomies, device=None) -> torch.Tensor:
    """A CTBatch's label maps -> bool [B, K, D, H, W] for these organs, by the masks' own label
    map (`mask_labels` in each sample's json; one map per batch)."""
    if batch.anatomy is None:
        raise ValueError("organ embeddings need anatomy masks in the shards (ctvlp shard --masks, or the synthetic "
                         "cohort)")
    maps = {tuple(sorted(m.get("mask_labels", {}).items())) for m in batch.meta}
    if len(maps) != 1:
        raise ValueError(f"one batch holds samples with different mask label maps: {sorted(maps)[:2]}")
    labels = dict(next(iter(maps)))
    absent = [a for a in anatomies if a not in labels]
    if absent:
        raise ValueError(f"model.anatomies {absent} are not in the masks' label map {sorted(labels)}")
    return organ_masks(batch.anatomy.to(device if device is not None else batch.anatomy.device),
                       [int(labels[a]) for a in anatomies])


def pooled_keep(masks: torch.Tensor, grid) -> torch.Tensor:
    """Organ masks [B, K, D, H, W] max-pooled to a feature grid -> bool [B, K, positions]."""
    return F.adaptive_max_pool3d(masks.float(), tuple(grid)).flatten(2) > 0


class AnatomyPool(nn.Module):
    def __init__(self, in_dims: list[int], organs: int, out_dim: int, width: int = 256, heads: int = 8):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(c, width) for c in in_dims)
        self.query = nn.Parameter(torch.randn(organs, width) / math.sqrt(width))
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out = nn.Parameter(torch.empty(organs, width, out_dim))
        bound = 1 / math.sqrt(width)  # nn.Linear's default, per organ
        nn.init.uniform_(self.out, -bound, bound)
        self.heads = heads

    def forward(self, maps: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
        """maps: feature maps [B, C_l, d, h, w] of the chosen layers; masks: bool [B, K, D, H, W]
        -> organ features [B, K, out_dim]."""
        tokens, keep = [], []
        for m, proj in zip(maps, self.proj):
            tokens.append(proj(m.flatten(2).transpose(1, 2).to(proj.weight.dtype)))
            keep.append(pooled_keep(masks, m.shape[2:]))
        tok, keep = torch.cat(tokens, 1), torch.cat(keep, 2)  # [B, N, width], [B, K, N]
        keep = keep | ~keep.any(-1, keepdim=True)
        q = self.query.to(tok.dtype).expand(tok.shape[0], -1, -1)
        o, _ = self.attn(q, tok, tok, attn_mask=(~keep).repeat_interleave(self.heads, 0), need_weights=False)
        return torch.einsum("bkw,kwo->bko", o, self.out.to(o.dtype))
