"""Models: the 3D ResNet-18 image tower, the HF text tower, CT-CLIP heads, op entry points."""
from .clip import CTCLIP
from .ops import Conv3d, conv3d, register_conv3d
from .resnet3d import BasicBlock3d, ResNet3d18
from .text import TextEncoder


def build_model(cfg, kernels=None) -> CTCLIP:
    """Model config (the `model:` section) -> CTCLIP; `kernels` (the `kernels:` section) may set
    the Triton convolutions' tiles."""
    tiles = None
    if kernels is not None and any((kernels.conv_fwd_tile, kernels.conv_dgrad_tile, kernels.conv_wgrad_tile)):
        from kernels.conv3d import fixed_tiles

        tiles = fixed_tiles(kernels.conv_fwd_tile, kernels.conv_dgrad_tile, kernels.conv_wgrad_tile)
    return CTCLIP(cfg, conv_tiles=tiles)


__all__ = ["CTCLIP", "ResNet3d18", "BasicBlock3d", "TextEncoder", "Conv3d", "conv3d", "register_conv3d", "build_model"]
