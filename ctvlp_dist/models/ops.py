"""Op entry points: the model asks for an op by name and does not know which implementation
runs it: "torch" (cuDNN / oneDNN) or "triton" (kernels/conv3d.py, implicit GEMM, forward and
backward in Triton; on CPU it needs TRITON_INTERPRET=1)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

_CONV3D: dict[str, Callable] = {"torch": F.conv3d}


def register_conv3d(name: str, fn: Callable) -> None:
    _CONV3D[name] = fn


def _lazy(impl: str) -> None:
    """The Triton convolution lives in kernels/ (it imports triton): loaded on first use."""
    if impl == "triton" and impl not in _CONV3D:
        from kernels.conv3d import conv3d_triton

        register_conv3d("triton", conv3d_triton)


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
