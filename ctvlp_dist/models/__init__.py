"""Models: the 3D ResNet-18 image tower, the HF text tower, CT-CLIP heads, op entry points."""
from .clip import CTCLIP
from .ops import Conv3d, conv3d, register_conv3d
from .resnet3d import BasicBlock3d, ResNet3d18
from .text import TextEncoder


def build_model(cfg) -> CTCLIP:
    """Model config (the `model:` section) -> CTCLIP."""
    return CTCLIP(cfg)


__all__ = ["CTCLIP", "ResNet3d18", "BasicBlock3d", "TextEncoder", "Conv3d", "conv3d", "register_conv3d", "build_model"]
