"""Op entry points: the model asks for an op by name and does not know which implementation
runs it: "torch" (cuDNN / oneDNN) or "triton" (kernels/conv3d.py, implicit GEMM, forward and
backward in Triton; on CPU it needs TRITON_INTERPRET=1).

Two levels: `conv3d` (one convolution, any norm around it) and the fused BatchNorm units
`fused_op(name, impl)` ("basic_block", "conv_bn_relu"; kernels/conv3d_block.py), which an
implementation may offer so that BatchNorm, ReLU and the residual run inside its kernels."""
from __future__ import annotations

import functools
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


def _check_tiles(impl: str, tiles) -> None:
    if tiles is not None and impl == "torch":
        raise ValueError("conv tiles (kernels.conv_*_tile) apply to the Triton convolution: set model.conv_impl=triton")


def fused_op(name: str, impl: str, tiles: Optional[Callable] = None) -> Optional[Callable]:
    """The implementation's fused BatchNorm unit `name`, or None (then the model composes
    conv3d with torch's norm and ReLU). `tiles`: the GEMM tile rule it launches with."""
    _lazy(impl)
    _check_tiles(impl, tiles)
    fn = _FUSED.get(impl, {}).get(name)
    return functools.partial(fn, tiles=tiles) if fn is not None and tiles is not None else fn


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias=None, stride=1, padding=0, impl: str = "torch",
           tiles: Optional[Callable] = None) -> torch.Tensor:
    _lazy(impl)
    try:
        fn = _CONV3D[impl]
    except KeyError:
        raise ValueError(f"unknown conv3d implementation {impl!r}; registered: {sorted(_CONV3D)}") from None
    _check_tiles(impl, tiles)
    return fn(x, weight, bias, stride, padding) if tiles is None else fn(x, weight, bias, stride, padding, tiles=tiles)


class Conv3d(torch.nn.Conv3d):
    """nn.Conv3d whose forward goes through the `conv3d` entry point."""

    def __init__(self, *args, impl: str = "torch", tiles: Optional[Callable] = None, **kw):
        super().__init__(*args, **kw)
        self.impl, self.tiles = impl, tiles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d(x, self.weight, self.bias, self.stride, self.padding, impl=self.impl, tiles=self.tiles)
