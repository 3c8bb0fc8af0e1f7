"""The two stages' objectives, shared by the engine and GradCache.

supervised: multi-label BCE on the silver labels. Hard label -1 (uncertain) follows
`uncertain`: "ignore" (masked out, default), "positive" (U-ones) or "negative" (U-zeros).
NaN labels (reports that failed to label) are always masked.
clip: symmetric InfoNCE over the global batch (`ctvlp_dist.loss.clip_loss`) plus, optionally,
`aux_weight` x the BCE of the shared classifier on both modalities' latents (the seed paper).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..loss import clip_loss

UNCERTAIN = ("ignore", "positive", "negative")


def label_targets(labels: torch.Tensor, uncertain: str = "ignore") -> tuple[torch.Tensor, torch.Tensor]:
    """1/0/-1/NaN labels -> (targets in {0, 1}, mask of entries that count)."""
    if uncertain not in UNCERTAIN:
        raise ValueError(f"uncertain must be one of {UNCERTAIN}, got {uncertain!r}")
    mask = ~torch.isnan(labels)
    unc = labels == -1
    if uncertain == "ignore":
        mask = mask & ~unc
    target = torch.where(unc, torch.full_like(labels, 1.0 if uncertain == "positive" else 0.0), labels)
    return torch.nan_to_num(target, nan=0.0), mask


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, uncertain: str = "ignore") -> torch.Tensor:
    """Mean BCE over the entries that count (0 when none do, with a gradient of zero)."""
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()  # BCE in at least fp32 whatever the model's precision
    target, mask = label_targets(labels.to(logits.dtype), uncertain)
    per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (per * mask).sum() / mask.sum().clamp_min(1)


def supervised_objective(model, volume: torch.Tensor, labels: torch.Tensor, uncertain: str = "ignore",
                         texts: Optional[dict] = None) -> torch.Tensor:
    """BCE of the image encoder's latent through the shared classifier (and the text encoder's too,
    when tokens are given). `model` is a CTCLIP or its DeepSpeed engine: model(part, x)."""
    loss = masked_bce(model("classify", model("image", volume)), labels, uncertain)
    if texts is not None:
        loss = loss + masked_bce(model("classify", model("text", texts)), labels, uncertain)
    return loss


def clip_objective(model, z_image: torch.Tensor, z_text: torch.Tensor, labels: Optional[torch.Tensor] = None,
                   aux_weight: float = 0.0, uncertain: str = "ignore", group_ids=None,
                   aux_text: bool = True, kernels=None) -> torch.Tensor:
    """InfoNCE over the global batch (+ aux BCE on the local rows); usable as GradCache's loss_fn.
    `aux_text=False` leaves the text latents out of the BCE: a single sampled sentence does not
    carry the report's labels."""
    tiles = dict(fwd_tiles=kernels.clip_fwd_tiles, bwd_tiles=kernels.clip_bwd_tiles) if kernels is not None else {}
    loss = clip_loss(z_image, z_text, model("scale"), group_ids=group_ids, **tiles)
    if aux_weight and labels is not None:
        aux = masked_bce(model("classify", z_image), labels, uncertain)
        if aux_text:
            aux = aux + masked_bce(model("classify", z_text), labels, uncertain)
        loss = loss + aux_weight * aux
    return loss
