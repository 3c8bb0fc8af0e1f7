"""fVLM's stage (`train.stage: fvlm`): anatomy-level contrastive learning with false negatives
calibrated.

Per organ, over the global batch: the symmetric InfoNCE between organ image embeddings and the
organ's report text, with `group_ids` (all normal texts one group, identical abnormal texts
one group: fVLM's exact soft targets) and a `valid` row mask (an organ absent from the crop, or
cut by it, takes no part, and the shapes stay equal on every rank). An organ's term counts only
when the global batch holds an intact abnormal instance of it; one all-reduce decides that
before any collective of the loss, so every rank takes the same branch. The organ terms are
summed; an optional report-level CLIP term has its own weight. Unlike fVLM's no-grad gather,
the features of other ranks carry their gradient home (the distributed loss does this).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..data.batch import CTBatch
from ..data.text import text_group_ids
from ..loss import clip_loss
from ..models.anatomy import batch_organ_masks

NORMAL_GROUP = 0  # the group id of every normal organ text


def organ_validity(masks: torch.Tensor, drop_cut: bool) -> torch.Tensor:
    """bool [B, K]: the organ is in the crop and (with drop_cut) touches none of its faces (fVLM
    drops organs that the random crop cuts)."""
    present = masks.flatten(2).any(-1)
    if not drop_cut:
        return present
    faces = [masks[:, :, 0], masks[:, :, -1], masks[:, :, :, 0], masks[:, :, :, -1], masks[..., 0], masks[..., -1]]
    cut = torch.stack([f.flatten(2).any(-1) for f in faces]).any(0)
    return present & ~cut


def organ_groups(texts: Sequence[Optional[Sequence[str]]], normal: torch.Tensor) -> torch.Tensor:
    """int64 [B, K]: NORMAL_GROUP for a normal organ, else its text's hash (equal texts, equal
    ids, on every rank)."""
    B, K = normal.shape
    flat = [t[k] if t is not None else "" for t in texts for k in range(K)]
    ids = text_group_ids(flat).view(B, K)
    return torch.where(normal.cpu(), torch.full_like(ids, NORMAL_GROUP), ids)


def counted_organs(valid: torch.Tensor, normal: torch.Tensor) -> list[bool]:
    """Per organ: does the global batch hold an intact abnormal instance? One all-reduce."""
    n = (valid & ~normal).sum(0).to(torch.int64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        n = n.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(n)
    return [bool(x) for x in n.tolist()]


def fvlm_loss(z_image: torch.Tensor, z_text: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor,
              groups: torch.Tensor, counted: Sequence[bool], global_weight: float = 0.0, kernels=None,
              terms: Optional[dict] = None) -> torch.Tensor:
    """z_*: [b, 1 + K, d] (the report / global embedding first, then the organs'); valid and
    groups [b, K] (this rank's rows). Sum over counted organs of the masked, grouped InfoNCE, plus
    global_weight x the report-level InfoNCE. `terms`, when given, receives each term's value."""
    tiles = dict(fwd_tiles=kernels.clip_fwd_tiles, bwd_tiles=kernels.clip_bwd_tiles) if kernels is not None else {}
    loss = (z_image.sum() + z_text.sum()) * 0.0  # keeps the graph when no term counts
    dev = z_image.device
    for k, on in enumerate(counted):
        if not on:
            continue
        t = clip_loss(z_image[:, 1 + k], z_text[:, 1 + k], scale, group_ids=groups[:, k].to(dev),
                      valid=valid[:, k].to(dev), **tiles)
        loss = loss + t
        if terms is not None:
            terms[k] = float(t.detach())
    if global_weight:
        t = clip_loss(z_image[:, 0], z_text[:, 0], scale, **tiles)
        loss = loss + global_weight * t
        if terms is not None:
            terms["global"] = float(t.detach())
    return loss


def fvlm_texts(batch: CTBatch) -> list[str]:
    """Per sample, the report then its organs' texts (a failed split: the report K times; those
    rows are masked)."""
    if batch.organ_text is None:
        raise ValueError("train.stage=fvlm needs per-organ texts: set loader.organ_texts=<split.parquet> "
                         "(written by `ctvlp label split`)")
    K = batch.organ_normal.shape[1]
    return [t for r, ts in zip(batch.report, batch.organ_text) for t in [r, *(ts if ts is not None else [r] * K)]]


def fvlm_step(engine, batches: Sequence[CTBatch], tc, timer, tokenize: Callable, kernels=None) -> float:
    """One step: the organ masks and validity per micro-batch, one image pass for the global and
    organ embeddings, the texts as [report, organ 1..K] per sample; GradCache above one
    micro-batch, exactly as the clip stage."""
    from .step import contrastive_step, model_inputs

    anatomies = engine.module.anatomies
    K = len(anatomies)
    masks, valid, normal, texts = [], [], [], []
    for b in batches:
        m = batch_organ_masks(b, anatomies, engine.device)
        ok = torch.tensor([t is not None for t in b.organ_text], device=m.device)
        masks.append(m)
        valid.append(organ_validity(m, tc.fvlm_drop_cut) & ok[:, None])
        normal.append(b.organ_normal.to(m.device))
        texts += b.organ_text
    valid_all, normal_all = torch.cat(valid), torch.cat(normal)
    groups = organ_groups(texts, normal_all)
    counted = counted_organs(valid_all, normal_all)  # before any collective of the loss: same branch everywhere

    def loss_fn(zi, zt):
        return fvlm_loss(zi, zt, engine.module("scale"), valid_all, groups, counted, tc.fvlm_global_weight, kernels)

    def encode_image(x):
        return engine("organs", x)

    def encode_text(t):
        return engine("text", t).view(-1, 1 + K, engine.module.text_proj.out_features)

    images = [(model_inputs(engine, b), m) for b, m in zip(batches, masks)]
    return contrastive_step(engine, encode_image, encode_text, images, [tokenize(fvlm_texts(b)) for b in batches],
                            loss_fn, timer)
