"""Plain torch references for the fused 3D convolution kernels (the ground truth in tests).

The training block's fused pieces, in the order they run:
  y = conv(x, W) + b
  moments = (mean_m y, var_m y)     per output channel (biased var), the next BatchNorm's batch
                                    statistics
  out = ReLU(y + residual)          each part optional
BatchNorm normalises with the biased var and updates its running statistics with the unbiased
one (count / (count - 1)), as nn.BatchNorm3d.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def reference_conv3d(x, weight, bias=None, stride=1, padding=0, *, residual=None, relu=False):
    """conv3d(x) + bias (+ residual) (ReLU), computed in the inputs' dtype, and the batch moments
    of conv3d(x) + bias."""
    y = F.conv3d(x, weight, bias, stride, padding)
    moments = torch.stack([y.mean(dim=(0, 2, 3, 4)), y.var(dim=(0, 2, 3, 4), unbiased=False)])
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    return y, moments


def bn_affine(moments: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float):
    """Batch (mean, biased var) -> (scale, shift) with BN(y) = y * scale + shift, plus mean and var."""
    mean, var = moments[0], moments[1].clamp_min(0)
    scale = gamma / torch.sqrt(var + eps)
    return scale, beta - mean * scale, mean, var


def update_running_stats(bn: torch.nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                         count: int) -> None:
    """What nn.BatchNorm3d does in training mode: momentum update with the unbiased variance."""
    with torch.no_grad():
        bn.num_batches_tracked += 1
        m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
        bn.running_var.mul_(1 - m).add_((var * count / max(count - 1, 1)).to(bn.running_var.dtype), alpha=m)


def fold_bn(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: torch.nn.modules.batchnorm._BatchNorm):
    """Inference: BN(conv(x, W) + b) = conv(x, W * s) + (b - mean) * s + beta, s = gamma / sqrt(var + eps)."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return weight * s.view(-1, 1, 1, 1, 1), (b - bn.running_mean) * s + bn.bias
