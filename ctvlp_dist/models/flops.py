"""Counted FLOPs of the 3D ResNet-18 image tower at a given input, for MFU.

Every convolution and linear layer is counted from its output shape (a multiply-add is 2 FLOPs):
conv: 2 * out_voxels * C_out * (C_in / groups) * prod(kernel). Norms, activations and pooling are
left out, as in the usual MFU convention (PaLM, torchtitan): they are memory-bound and < 1% of the
FLOPs here. Shapes come from one forward on the meta device, so nothing is allocated.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def conv_linear_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs of one sample (input_shape excludes the batch dimension)."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv3d):
            total += 2 * out[0].numel() * mod.in_channels // mod.groups * math.prod(mod.kernel_size)
        else:
            total += 2 * out[0].numel() * mod.in_features

    meta = _meta_copy(model)
    handles = [m.register_forward_hook(hook) for m in meta.modules() if isinstance(m, (nn.Conv3d, nn.Linear))]
    try:
        with torch.no_grad():
            meta(torch.empty((1, *input_shape), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total


def _meta_copy(model: nn.Module) -> nn.Module:
    import copy

    m = copy.deepcopy(model).to("meta")
    return m.eval()


def image_tower_train_flops(cfg, crop: tuple[int, int, int]) -> int:
    """FLOPs per scan of one training step of the image tower: forward + backward = 3x forward
    (the backward computes input and weight gradients, each as costly as the forward).
    GradCache's extra no-grad forward is overhead, not model FLOPs, so it is not counted. The
    count does not depend on model.conv_impl: shapes come from the torch ops, which run on meta."""
    from .resnet3d import ResNet3d18

    with torch.device("meta"):
        tower = ResNet3d18(cfg.stem, cfg.norm, cfg.gn_groups, False, "torch", cfg.width)
    return 3 * conv_linear_flops(tower, (1, *crop))


# Dense (no sparsity) peak TFLOP/s per GPU, from the vendors' data sheets.
PEAK_TFLOPS = {
    ("H100", "bf16"): 989.4, ("H100", "fp32"): 494.7,  # SXM; fp32 via TF32 tensor cores
    ("H200", "bf16"): 989.4, ("H200", "fp32"): 494.7,
    ("A100", "bf16"): 312.0, ("A100", "fp32"): 156.0,
}


def device_peak_tflops(precision: str) -> float:
    """Peak of the current CUDA device for `precision` (bf16 | fp32), 0.0 when unknown or on CPU."""
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name(0)
    for (chip, prec), peak in PEAK_TFLOPS.items():
        if chip in name and prec == precision:
            return peak
    return 0.0
