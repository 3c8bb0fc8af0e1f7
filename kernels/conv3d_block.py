"""The ResNet training block on the fused conv3d kernels, forward and backward:

    out = ReLU(BN2(conv2(ReLU(BN1(conv1(x))))) + shortcut),  shortcut = x or BNd(convd(x))

and the stem's conv -> BN -> ReLU. Training-mode BatchNorm uses batch statistics and updates the
running statistics exactly as nn.BatchNorm3d does; eval mode uses the running statistics, and
without autograd folds them into the weights (conv_block_inference).

What is written to memory per block: the raw convolution outputs y1, y2 (, yd) and the block
output; torch also keeps BN1's and BN2's outputs, the ReLU and the sum. The passes:
  forward   conv1 (+ batch stats), [convd (+ stats)], BN1 + ReLU, conv2 (+ stats),
            bn_act (BN2 + shortcut + ReLU)
  backward  bn_act_bwd (ReLU mask; BN2's [and BNd's] reductions), dY2 (BN2 backward),
            BN1 + ReLU recomputed, conv2 wgrad, conv2 dgrad (ReLU mask and BN1's reductions in
            the epilogue), dY1 (BN1 backward), conv1 wgrad, [dYd, convd wgrad, dgrad],
            conv1 dgrad (+ the shortcut's gradient)
A BatchNorm's backward is, per channel, dY = alpha dZ + beta Y + gamma once its two batch
reductions are known.

The BatchNorm maps (BN1 + ReLU on conv2's input, each BN backward on dY) are applied by one
elementwise pass each into a transient buffer, which the plain GEMMs read: dY once for both its
dgrad and wgrad; BN1 + ReLU once in the forward and once more in the backward (recomputed,
never kept). Mapping the operand tiles inside the GEMMs' loads instead cost each GEMM 2-2.8x on
an H100 (the mapped tile goes shared memory -> registers -> wgmma at the 255-register limit),
while a pass costs ~0.5 ms at layer1's size: passes made layer1.0's training step 1.9x faster
(benchmarks/results/conv-gpu-20261123T053658.json against ...T054423.json), so only they remain.

Every function takes `tiles`, the GEMM tile rule (conv3d.conv_tiles unless given)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .conv3d import (TileRule, bn_act_backward, bn_act_forward, conv3d_dgrad, conv3d_forward, conv3d_wgrad,
                     conv_block_inference)
from .conv3d_ref import bn_affine, update_running_stats

__all__ = ["fused_basic_block", "fused_conv_bn_relu", "bn_backward_coefs"]


@dataclass
class BNState:
    """What a BatchNorm's forward derives and its backward needs (fp32, per channel)."""
    scale: torch.Tensor  # BN(y) = y scale + shift
    shift: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor
    count: int
    batch_stats: bool  # normalised by the batch's statistics (training) or the running ones
    param_dtype: torch.dtype  # gamma's and beta's, which their gradients take


def bn_forward(moments: torch.Tensor, count: int, bn: nn.modules.batchnorm._BatchNorm) -> BNState:
    """From the conv epilogue's batch (mean, biased var): the affine map, and in training mode the
    running-statistics update. Which statistics normalise follows F.batch_norm's rule."""
    if bn.weight is None:
        raise ValueError("the fused block needs affine BatchNorm (affine=True)")
    gamma, beta = bn.weight.detach().float(), bn.bias.detach().float()
    batch = bn.training or bn.running_mean is None
    if batch and count < 2:
        raise ValueError(f"BatchNorm in training mode needs more than 1 value per channel, got {count}")
    if not batch:
        moments = torch.stack([bn.running_mean, bn.running_var]).float()
    scale, shift, mean, var = bn_affine(moments, gamma, beta, bn.eps)
    if batch and bn.training and bn.track_running_stats:
        update_running_stats(bn, mean, var, count)
    return BNState(scale.contiguous(), shift.contiguous(), mean.contiguous(), torch.rsqrt(var + bn.eps), count, batch,
                   bn.weight.dtype)


def bn_backward_coefs(st: BNState, sum_dz: torch.Tensor, sum_dz_yc: torch.Tensor):
    """The two reductions (sum dZ, sum dZ (Y - mean)) -> ((alpha, beta, gamma) with
    dY = alpha dZ + beta Y + gamma, d gamma_bn, d beta_bn). Batch statistics add the terms that
    flow through the mean and variance: dY = s (dZ - mean(dZ) - x_hat mean(dZ x_hat))."""
    dgamma, dbeta = st.rstd * sum_dz_yc, sum_dz
    grads = dgamma.to(st.param_dtype), dbeta.to(st.param_dtype)
    if not st.batch_stats:
        zero = torch.zeros_like(st.scale)
        return (st.scale, zero, zero), *grads
    beta = -st.scale * st.rstd * dgamma / st.count
    gamma = -st.scale * dbeta / st.count - beta * st.mean
    return (st.scale, beta.contiguous(), gamma.contiguous()), *grads


def _bn_relu(y: torch.Tensor, st: BNState) -> torch.Tensor:
    """ReLU(BN(y)) by one elementwise pass (conv2's input, and the wgrad's in the backward)."""
    return bn_act_forward(y, st.scale, st.shift)


def _bn_bwd(dz: torch.Tensor, y: torch.Tensor, coefs) -> torch.Tensor:
    """dY = alpha dZ + beta Y + gamma by one elementwise pass, read by both the dgrad and wgrad."""
    alpha, beta, gamma = coefs
    return bn_act_forward(dz, alpha, gamma, residual=y, res_scale=beta, res_shift=torch.zeros_like(beta), relu=False)


def _count(y: torch.Tensor) -> int:
    return y.numel() // y.shape[1]


def _all_eval(*bns) -> bool:
    return not any(b is not None and b.training for b in bns)


class _ConvBNReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, gamma, beta, conv, bn, tiles):
        y, st = conv3d_forward(x, w, None, conv.stride, conv.padding, stats=True, tiles=tiles)
        n = bn_forward(st, _count(y), bn)
        out = bn_act_forward(y, n.scale, n.shift)
        ctx.save_for_backward(x, w, y, out)
        ctx.conv, ctx.bn, ctx.tiles = conv, n, tiles
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, y, out = ctx.saved_tensors
        c, n, tiles = ctx.conv, ctx.bn, ctx.tiles
        dz, red = bn_act_backward(dout, out, y, n.mean)
        coefs, dg, db = bn_backward_coefs(n, red[0], red[1])
        dy = _bn_bwd(dz, y, coefs)
        need = ctx.needs_input_grad
        dx = conv3d_dgrad(dy, w, x.shape, c.stride, c.padding, x.dtype, tiles=tiles) if need[0] else None
        dw = conv3d_wgrad(x, dy, w.shape, c.stride, c.padding, w.dtype, tiles=tiles) if need[1] else None
        return dx, dw, dg, db, None, None, None


def fused_conv_bn_relu(conv: nn.Conv3d, bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, *,
                       tiles: Optional[TileRule] = None) -> torch.Tensor:
    """ReLU(bn(conv(x))) (the stem), with the same parameters, gradients and running statistics."""
    if not torch.is_grad_enabled() and _all_eval(bn):
        return conv_block_inference(x, conv.weight, bn, conv.stride, conv.padding, relu=True, tiles=tiles)
    return _ConvBNReLUFn.apply(x, conv.weight, bn.weight, bn.bias, conv, bn, tiles)


class _BasicBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, g1, b1, w2, g2, b2, wd, gd, bd, blk, tiles):
        c1, c2 = blk.conv1, blk.conv2
        y1, st = conv3d_forward(x, w1, None, c1.stride, c1.padding, stats=True, tiles=tiles)
        n1 = bn_forward(st, _count(y1), blk.bn1)
        a1 = _bn_relu(y1, n1)
        y2, st = conv3d_forward(a1, w2, None, c2.stride, c2.padding, stats=True, tiles=tiles)
        del a1  # not kept: the backward recomputes it
        n2 = bn_forward(st, _count(y2), blk.bn2)
        yd, nd = None, None
        if blk.down is not None:
            cd = blk.down[0]
            yd, st = conv3d_forward(x, wd, None, cd.stride, cd.padding, stats=True, tiles=tiles)
            nd = bn_forward(st, _count(yd), blk.down[1])
            out = bn_act_forward(y2, n2.scale, n2.shift, residual=yd, res_scale=nd.scale, res_shift=nd.shift)
        else:
            out = bn_act_forward(y2, n2.scale, n2.shift, residual=x)
        ctx.save_for_backward(x, w1, w2, wd, y1, y2, yd, out)
        ctx.blk, ctx.bns, ctx.tiles = blk, (n1, n2, nd), tiles
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w1, w2, wd, y1, y2, yd, out = ctx.saved_tensors
        blk, (n1, n2, nd), tiles = ctx.blk, ctx.bns, ctx.tiles
        c1, c2 = blk.conv1, blk.conv2
        need = ctx.needs_input_grad
        dz, red = bn_act_backward(dout, out, y2, n2.mean, residual=yd, res_mean=nd.mean if nd else None)
        k2, dg2, db2 = bn_backward_coefs(n2, red[0], red[1])
        dy2 = _bn_bwd(dz, y2, k2)
        if need[4]:
            a1 = _bn_relu(y1, n1)
            dw2 = conv3d_wgrad(a1, dy2, w2.shape, c2.stride, c2.padding, w2.dtype, tiles=tiles)
            del a1
        else:
            dw2 = None
        dz1, red1 = conv3d_dgrad(dy2, w2, y1.shape, c2.stride, c2.padding, y1.dtype,
                                 relu_bn=(y1, n1.scale, n1.shift, n1.mean), tiles=tiles)
        del dy2
        k1, dg1, db1 = bn_backward_coefs(n1, red1[0], red1[1])
        dy1 = _bn_bwd(dz1, y1, k1)
        dw1 = conv3d_wgrad(x, dy1, w1.shape, c1.stride, c1.padding, w1.dtype, tiles=tiles) if need[1] else None
        dwd = dgd = dbd = None
        shortcut = dz
        if nd is not None:
            cd = blk.down[0]
            kd, dgd, dbd = bn_backward_coefs(nd, red[0], red[2])
            dyd = _bn_bwd(dz, yd, kd)
            dwd = conv3d_wgrad(x, dyd, wd.shape, cd.stride, cd.padding, wd.dtype, tiles=tiles) if need[7] else None
            shortcut = conv3d_dgrad(dyd, wd, x.shape, cd.stride, cd.padding, x.dtype, tiles=tiles) if need[0] else None
        dx = conv3d_dgrad(dy1, w1, x.shape, c1.stride, c1.padding, x.dtype, residual=shortcut, tiles=tiles) \
            if need[0] else None
        return dx, dw1, dg1, db1, dw2, dg2, db2, dwd, dgd, dbd, None, None


def fused_basic_block(blk: nn.Module, x: torch.Tensor, *, tiles: Optional[TileRule] = None) -> torch.Tensor:
    """A BasicBlock3d (conv1, bn1, conv2, bn2, optional down = (conv, bn)) on the fused kernels."""
    down = blk.down
    if not torch.is_grad_enabled() and _all_eval(blk.bn1, blk.bn2, down[1] if down is not None else None):
        a1 = conv_block_inference(x, blk.conv1.weight, blk.bn1, blk.conv1.stride, blk.conv1.padding, relu=True,
                                  tiles=tiles)
        sc = x if down is None else conv_block_inference(x, down[0].weight, down[1], down[0].stride, down[0].padding,
                                                         relu=False, tiles=tiles)
        return conv_block_inference(a1, blk.conv2.weight, blk.bn2, blk.conv2.stride, blk.conv2.padding, residual=sc,
                                    tiles=tiles)
    wd, gd, bd = (down[0].weight, down[1].weight, down[1].bias) if down is not None else (None, None, None)
    return _BasicBlockFn.apply(x, blk.conv1.weight, blk.bn1.weight, blk.bn1.bias, blk.conv2.weight, blk.bn2.weight,
                               blk.bn2.bias, wd, gd, bd, blk, tiles)
