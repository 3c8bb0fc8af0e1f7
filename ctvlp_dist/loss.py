"""The one contrastive-loss entry point the training engine calls.

It picks the process group (all ranks when torch.distributed is initialised with more than
one) and the implementation (`kernels.contrastive`: Triton on CUDA, chunked torch on CPU), so
that model and engine code never change when the kernel does.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.contrastive import blockwise_clip_loss


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, *,
              group_ids=None, valid=None, reduction: str = "mean", impl: str = "auto", process_group="auto",
              grad_average: bool = True, fwd_tiles=None, bwd_tiles=None) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch. Each rank passes its own rows; the value is the
    global loss on every rank; with grad_average=True the gradients are right after the
    framework (DeepSpeed, DDP) averages them over ranks. `fwd_tiles`/`bwd_tiles`: the Triton
    kernels' tiles (kernels.contrastive_triton.ClipTiles), their measured rule unless given.
    `valid`: a bool row mask; masked pairs take no part (fVLM's dropped organs)."""
    if process_group == "auto":
        process_group = dist.group.WORLD if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
            else None
    return blockwise_clip_loss(image_features, text_features, logit_scale, group_ids=group_ids, valid=valid,
                               reduction=reduction, impl=impl, process_group=process_group, grad_average=grad_average, fwd_tiles=fwd_tiles,
                               bwd_tiles=bwd_tiles)
