"""3D ResNet-18 (r3d-18 layout: 64/128/256/512 channels, strides 1/2/2/2), one input channel,
global average pooling to 512-d. Stems: `standard` (7^3 stride 2 + 3^3 max-pool), the seed
paper's `k2s2` (2^3 stride 2) and its lite `k4s4` (4^3 stride 4)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .ops import Conv3d, fused_op


def _norm(kind: str, ch: int, groups: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm3d(ch)
    if kind == "gn":
        return nn.GroupNorm(min(groups, ch), ch)
    raise ValueError(f"model.norm must be bn or gn, got {kind!r}")


class BasicBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, groups: int, impl: str, tiles=None):
        super().__init__()
        self.conv1 = Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False, impl=impl, tiles=tiles)
        self.bn1 = _norm(norm, cout, groups)
        self.conv2 = Conv3d(cout, cout, 3, stride=1, padding=1, bias=False, impl=impl, tiles=tiles)
        self.bn2 = _norm(norm, cout, groups)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(Conv3d(cin, cout, 1, stride=stride, bias=False, impl=impl, tiles=tiles),
                                      _norm(norm, cout, groups))
        self._fused = fused_op("basic_block", impl, tiles) if norm == "bn" else None

    def forward(self, x):
        if self._fused is not None:  # BN, ReLU and the shortcut inside the implementation's kernels
            return self._fused(self, x)
        idt = x if self.down is None else self.down(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + idt)


STEMS = {"standard": (7, 2, 3, True), "k2s2": (2, 2, 0, False), "k4s4": (4, 4, 0, False)}


class Stem3d(nn.Sequential):
    """conv, norm, ReLU (, max-pool): a Sequential, so checkpoints keep the `stem.N` keys; the
    first three run as one fused unit when the implementation has it (BN only)."""

    def __init__(self, *layers, impl: str = "torch", tiles=None):
        super().__init__(*layers)
        self._fused = fused_op("conv_bn_relu", impl, tiles) if isinstance(layers[1], nn.BatchNorm3d) else None

    def forward(self, x):
        if self._fused is None:
            return super().forward(x)
        x = self._fused(self[0], self[1], x)
        return self[3](x) if len(self) > 3 else x


class ResNet3d18(nn.Module):
    def __init__(self, stem: str = "k2s2", norm: str = "bn", gn_groups: int = 32, channels_last: bool = True,
                 conv_impl: str = "torch", width: int = 64, conv_tiles=None):
        """`width` is the first stage's channel count (64 in the paper; stages double it): narrow
        towers make CPU demos and interpreter tests of the Triton convolution affordable.
        `conv_tiles`: the Triton GEMMs' tile rule (kernels.conv3d.conv_tiles unless given)."""
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"model.stem must be one of {sorted(STEMS)}, got {stem!r}")
        k, s, p, pool = STEMS[stem]
        layers = [Conv3d(1, width, k, stride=s, padding=p, bias=False, impl=conv_impl, tiles=conv_tiles),
                  _norm(norm, width, gn_groups),
                  nn.ReLU(inplace=True)]
        if pool:
            layers.append(nn.MaxPool3d(3, stride=2, padding=1))
        self.stem = Stem3d(*layers, impl=conv_impl, tiles=conv_tiles)
        chans, blocks, cin = [width, 2 * width, 4 * width, 8 * width], [], width
        self.out_dim = 8 * width
        for i, c in enumerate(chans):
            stride = 1 if i == 0 else 2
            blocks.append(nn.Sequential(BasicBlock3d(cin, c, stride, norm, gn_groups, conv_impl, conv_tiles),
                                        BasicBlock3d(c, c, 1, norm, gn_groups, conv_impl, conv_tiles)))
            cin = c
        self.layers = nn.Sequential(*blocks)
        self.channels_last = channels_last
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for blk in self.modules():  # zero-init the last norm of each residual branch (stable deep start)
            if isinstance(blk, BasicBlock3d) and hasattr(blk.bn2, "weight"):
                nn.init.zeros_(blk.bn2.weight)


    @property
    def stage_dims(self) -> list[int]:
        return [blk[-1].conv2.out_channels for blk in self.layers]

    def forward(self, x: torch.Tensor, features: tuple[int, ...] = ()):
        """Global average pooled features [B, out_dim]; with `features` (stage indices, 1-based
        as layer1..layer4), also those stages' maps: (pooled, [maps])."""
        # Activations run in channels_last_3d; weights stay contiguous, because DeepSpeed views
        # parameters as flat byte buffers (broadcast, ZeRO partitions) and cuDNN takes either.
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x = self.stem(x)
        if not features:
            return self.layers(x).mean(dim=(2, 3, 4))
        maps = []
        for i, stage in enumerate(self.layers, 1):
            x = stage(x)
            if i in features:
                maps.append(x)
        return x.mean(dim=(2, 3, 4)), maps
