"""Op entry points: the model asks for an op by name and does not know which implementation
runs it: "torch" (cuDNN / oneDNN) or "triton" (kernels/conv3d.py, implicit GEMM, forward and
backward in Triton; on CPU it needs TRITON_INTERPRET=1).

Two levels: `conv3d` (one convolution, any norm around it) and the fused BatchNorm units
`fused_op(name, impl)` ("basic_block", "conv_bn_relu"; kernels/conv3d_block.py), which an
implementation may offer so that BatchNorm, ReLU and the residual run inside its kernels."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

_CONV3D: dict[str, Callable] = {"torch": F.conv3d}
_FUSED: dict[str, dict[str, Callable]] = {}


def register_conv3d(name: str, fn: Callable) -> None:
    _CONV3D[name] = fn


def _lazy(impl: str) -> None:
    """The Triton convolution lives in kernels/ (it imports triton): loaded on first use."""
    if impl == "triton" and impl not in _CONV3D:
        from kernels.conv3d import conv3d_triton
        from kernels.conv3d_block import fused_basic_block, fused_conv_bn_relu

        register_conv3d("triton", conv3d_triton)
        _FUSED["triton"] = {"basic_block": fused_basic_block, "conv_bn_relu": fused_conv_bn_relu}


def fused_op(name: str, impl: str) -> Optional[Callable]:
    """The implementation's fused BatchNorm unit `name`, or None (then the model composes
    conv3d with torch's norm and ReLU)."""
    _lazy(impl)
    return _FUSED.get(impl, {}).get(name)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias=None, stride=1, padding=0, impl: str = "torch") -> torch.Tensor:
    _lazy(impl)
    try:
        fn = _CONV3D[impl]
    except KeyError:
        raise ValueError(f"unknown conv3d implementation {impl!r}; registered: {sorted(_CONV3D)}") from None
    return fn(x, weight, bias, stride, padding)


class Conv3d(torch.nn.Conv3d):
    """nn.Conv3d whose forward goes through the `conv3d` entry point."""

    def __init__(self, *args, impl: str = "torch", **kw):
        super().__init__(*args, **kw)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d(x, self.weight, self.bias, self.stride, self.padding, impl=self.impl)
