"""Fused 3D convolution for the ResNet image tower: implicit-GEMM Triton kernels, forward and
backward, with the BatchNorm/ReLU/residual work around each convolution folded in.

    conv3d_forward(x, w, bias, stride, padding, *, residual=None, relu=False, stats=False)
        -> y (, moments [2, Cout])
    conv3d_dgrad(dy, w, x_shape, stride, padding, dtype, *, residual=None, relu_bn=None)
    conv3d_wgrad(x, dy, w_shape, stride, padding, dtype)
    bn_act_forward / bn_act_backward   # BN + shortcut + ReLU, and its backward's reductions
    conv3d_triton(x, w, bias, stride, padding)   # F.conv3d's signature, with autograd
    conv_block_inference(x, w, bn, stride, padding, residual=None, relu=True)  # BN folded

Each GEMM launcher takes `tiles`, a rule (kind, M, N, K, chan) -> tile; `conv_tiles` is the
measured one, `fixed_tiles` overrides it per kind (the config's `kernels:` section).
`model.conv_impl: triton` runs the BatchNorm units of the tower (the residual block and the stem)
through conv3d_block.py, which composes these, and any other convolution through conv3d_triton.
CUDA tensors compile the kernels; CPU tensors need TRITON_INTERPRET=1 (the tests). Outputs come
back in channels_last_3d.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .conv3d_ref import bn_affine, fold_bn, reference_conv3d, update_running_stats
from .device import num_sms

__all__ = ["conv3d_forward", "conv3d_dgrad", "conv3d_wgrad", "conv3d_triton", "conv_block_inference",
           "reference_conv3d", "bn_affine", "update_running_stats", "fold_bn", "conv_tiles", "fixed_tiles", "KINDS"]

KINDS = ("fwd", "dgrad", "wgrad")
TILE_KEYS = ("BM", "BN", "BK", "num_warps", "num_stages")
TileRule = Callable[..., dict]


def triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * 3


def prec(dtype: torch.dtype) -> str:
    from .conv3d_triton import INTERPRET

    return "tf32" if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def conv_tiles(kind: str, M: int, N: int, K: int, chan: int = 0) -> dict:
    """The GEMM's tile: M x N output, K reduction, `chan` the channels reduced per tap (Cin in
    the forward, Cout in the dgrad). Interpreter: large tiles (its cost is per block operation).
    GPU: the fastest of the H100 sweep (bf16, seed tower, batch 8;
    benchmarks/results/conv-gpu-20261123T052022.json):
    - 128+ output channels (fwd Cout, dgrad Cin): 256 x 128 x 64, 8 warps (1.3-1.7x over the
      old 128 x 64 x 32 default);
    - narrower: 128 x 64 with BK 64 in the forward; BK 32 in the dgrad unless each tap reduces
      128+ channels (layer2's strided conv: 1.4x);
    - wgrad (M = Cout, N = taps x Cin, K = positions): 128 x 128 x 64, 8 warps from N = 4096;
      128 x 128 x 32, 4 warps, 4 stages from N = 1024 (1.7-1.9x), but 64 x 256 x 32, 8 warps
      for 64 output channels (layer1: 1.1x more); else 128 x 64 x 64.
    Small channel counts (the 1-channel stem) narrow BN and BK."""
    from .conv3d_triton import INTERPRET

    if kind not in KINDS:
        raise ValueError(f"conv tile kind must be one of {KINDS}, got {kind!r}")
    if INTERPRET:
        return dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=1)
    bn = 64 if N >= 64 else max(16, 1 << (N - 1).bit_length())
    small_bk = 32 if K >= 32 else 16
    if kind == "wgrad":
        if M <= 64 and N >= 1024:  # 64 output channels: a 128-row tile would be half masked
            return dict(BM=64, BN=256, BK=32, num_warps=8, num_stages=3)
        if N >= 4096:
            return dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)
        if N >= 1024:
            return dict(BM=128, BN=128, BK=32, num_warps=4, num_stages=4)
        return dict(BM=128, BN=bn, BK=64 if N >= 64 else 32, num_warps=4, num_stages=3)
    if N >= 128:
        return dict(BM=256, BN=128, BK=64, num_warps=8, num_stages=3)
    if kind == "fwd":
        bk = 64 if K >= 512 else small_bk
    else:
        bk = 64 if chan >= 128 and K > chan else small_bk
    return dict(BM=128, BN=bn, BK=bk, num_warps=4, num_stages=3)


def fixed_tiles(fwd=None, dgrad=None, wgrad=None) -> TileRule:
    """A rule that gives each named kind this (BM, BN, BK, num_warps, num_stages) tile, whatever
    the shape, and leaves the others to conv_tiles."""
    fixed = {}
    for kind, tile in (("fwd", fwd), ("dgrad", dgrad), ("wgrad", wgrad)):
        if tile is not None:
            if len(tile) != 5:
                raise ValueError(f"a {kind} tile is (BM, BN, BK, num_warps, num_stages), got {tuple(tile)}")
            fixed[kind] = dict(zip(TILE_KEYS, (int(v) for v in tile)))

    def rule(kind: str, M: int, N: int, K: int, chan: int = 0) -> dict:
        return dict(fixed[kind]) if kind in fixed else conv_tiles(kind, M, N, K, chan)
    return rule


def out_shape(x_shape, w_shape, stride, padding):
    return tuple((i + 2 * p - k) // s + 1 for i, k, s, p in zip(x_shape[2:], w_shape[2:], stride, padding))


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last_3d)


def gemm_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The forward's weight layout [Cout, kd, kh, kw, Cin]: K-contiguous, so its tiles load as
    16-byte vectors."""
    return w.to(dtype).permute(0, 2, 3, 4, 1).contiguous()


def conv3d_forward(x, w, bias=None, stride=1, padding=0, *, residual=None, relu=False, stats=False, out_dtype=None,
                   wk=None, tiles: Optional[TileRule] = None):
    """y = conv(x, w) + bias, then optional per-channel stats, + residual, ReLU. `wk`: the weight
    already in gemm_weight's layout and x's dtype (w then only gives the shape)."""
    import triton

    from .conv3d_triton import conv_fwd_kernel

    stride, padding = triple(stride), triple(padding)
    Nb, Cin = x.shape[:2]
    Cout = w.shape[0]
    if w.shape[1] != Cin:
        raise ValueError(f"weight expects {w.shape[1]} input channels, input has {Cin}")
    Do, Ho, Wo = out_shape(x.shape, w.shape, stride, padding)
    y = torch.empty((Nb, Cout, Do, Ho, Wo), dtype=out_dtype or x.dtype, device=x.device,
                    memory_format=torch.channels_last_3d)
    wk = gemm_weight(w, x.dtype) if wk is None else wk
    M, K = Nb * Do * Ho * Wo, w[0].numel()
    t = (tiles or conv_tiles)("fwd", M, Cout, K, Cin)
    st = torch.empty((triton.cdiv(M, t["BM"]), 2, Cout), dtype=torch.float32, device=x.device) if stats else y
    res = residual if residual is not None else y
    grid = (triton.cdiv(M, t["BM"]), triton.cdiv(Cout, t["BN"]))
    conv_fwd_kernel[grid](x, wk, y, bias if bias is not None else y, res, st,
                    Nb, Cin, *x.shape[2:], Cout, Do, Ho, Wo, *x.stride(), *y.stride(), *res.stride(),
                    *stride, *padding, *w.shape[2:], HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=relu,
                    STATS_ON=stats, PREC=prec(x.dtype), **t)
    return (y, merge_moments(st, M, t["BM"])) if stats else y


def merge_moments(part: torch.Tensor, count: int, rows: int) -> torch.Tensor:
    """Per-tile (sum, centred sum of squares) [T, 2, C], tiles of `rows` rows (the last one
    shorter) -> (mean, biased variance) [2, C], by Chan's parallel rule:
    M2 = sum_t M2_t + sum_t n_t (mean_t - mean)^2. Every term is non-negative, so nothing cancels."""
    n = torch.full((part.shape[0], 1), float(rows), dtype=torch.float32, device=part.device)
    n[-1] = count - rows * (part.shape[0] - 1)
    mean = part[:, 0].sum(0) / count
    m2 = part[:, 1].sum(0) + (n * (part[:, 0] / n - mean).square()).sum(0)
    return torch.stack([mean, m2 / count])


def conv3d_dgrad(dy, w, x_shape, stride, padding, dtype, *, residual=None, relu_bn=None,
                 tiles: Optional[TileRule] = None):
    """Input gradient. Fused, each optional:
    residual: another gradient of the same input, added;
    relu_bn = (y_in, scale, shift, mean): the input was ReLU(y_in scale + shift); returns the
        gradient at y_in's BatchNorm output and that BatchNorm's reductions [2, Cin]."""
    import triton

    from .conv3d_triton import conv_dgrad_kernel

    Nb, Cin = x_shape[:2]
    Cout = w.shape[0]
    dx = torch.empty(x_shape, dtype=dtype, device=dy.device, memory_format=torch.channels_last_3d)
    wk = w.to(dy.dtype).permute(2, 3, 4, 0, 1).contiguous()  # [kd, kh, kw, Cout, Cin]: Cin-contiguous rows
    res = same_layout(dx, residual) if residual is not None else dx
    if relu_bn is not None:
        yin, sc, sh, mu = same_layout(dx, relu_bn[0]), *relu_bn[1:]
        st = torch.zeros((2, Cin), dtype=torch.float32, device=dy.device)
    else:
        yin = sc = sh = mu = st = dx
    classes = stride[0] * stride[1] * stride[2]  # parity classes of the input positions
    M = Nb * math.prod(-(-v // s) for v, s in zip(x_shape[2:], stride))
    K = Cout * math.prod(-(-k // s) for k, s in zip(w.shape[2:], stride))  # taps per class, at most
    t = (tiles or conv_tiles)("dgrad", M, Cin, K, Cout)
    grid = (triton.cdiv(M, t["BM"]), triton.cdiv(Cin, t["BN"]), classes)
    conv_dgrad_kernel[grid](dy, wk, dx, res, yin, sc, sh, mu, st,
                      Nb, Cin, *x_shape[2:], Cout, *dy.shape[2:], *dy.stride(), *dx.stride(),
                      *stride, *padding, *w.shape[2:], HAS_RES=residual is not None, RELU_BN=relu_bn is not None,
                      PREC=prec(dy.dtype), **t)
    return (dx, st) if relu_bn is not None else dx


def conv3d_wgrad(x, dy, w_shape, stride, padding, dtype, *, tiles: Optional[TileRule] = None):
    """Weight gradient, fp32 partials over Q slices of the output positions, summed: enough
    programs to fill the chip even when Cout x taps x Cin is small (the deep layers)."""
    import triton

    from .conv3d_triton import INTERPRET, conv_wgrad_kernel

    Cout, Cin = w_shape[:2]
    KF = Cin * w_shape[2] * w_shape[3] * w_shape[4]
    P = dy[:, 0].numel()
    t = (tiles or conv_tiles)("wgrad", Cout, KF, P)
    n_tiles = triton.cdiv(Cout, t["BM"]) * triton.cdiv(KF, t["BN"])
    want = 2 if INTERPRET else max(1, min(triton.cdiv(4 * num_sms(dy.device), n_tiles), triton.cdiv(P, 512)))
    p_per = triton.cdiv(triton.cdiv(P, want), t["BK"]) * t["BK"]
    Q = triton.cdiv(P, p_per)
    part = torch.empty((Q, Cout, KF), dtype=torch.float32, device=dy.device)
    xk = x.to(dy.dtype)
    conv_wgrad_kernel[(triton.cdiv(Cout, t["BM"]), triton.cdiv(KF, t["BN"]), Q)](
        xk, dy, part, x.shape[0], Cin, *x.shape[2:], Cout, *dy.shape[2:], *xk.stride(), *dy.stride(), p_per,
        *stride, *padding, *w_shape[2:], PREC=prec(dy.dtype), **t)
    # [Cout, (kd, kh, kw, ci)] -> [Cout, ci, kd, kh, kw]
    return part.sum(0).view(Cout, *w_shape[2:], Cin).permute(0, 4, 1, 2, 3).to(dtype)


def same_layout(like: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A companion tensor read with `like`'s strides: same shape, dense channels_last_3d."""
    if t.shape != like.shape:
        raise ValueError(f"companion tensor has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
    return channels_last(t)


def _ew_grid(P: int, C: int):
    import triton

    from .conv3d_triton import INTERPRET

    bc = min(64, triton.next_power_of_2(C))
    bp = 64 if INTERPRET else max(16, 4096 // bc)
    return (triton.cdiv(P, bp), triton.cdiv(C, bc)), dict(BP=bp, BC=bc)


def bn_act_forward(y, scale, shift, *, residual=None, res_scale=None, res_shift=None, relu=True):
    """ReLU(y scale + shift + r), r = residual or residual res_scale + res_shift: the block's
    closing BatchNorm, shortcut add and ReLU in one pass (the stem's BatchNorm + ReLU without r)."""
    from .conv3d_triton import bn_act_fwd_kernel

    y = channels_last(y)
    out = torch.empty_like(y, memory_format=torch.channels_last_3d)
    C = y.shape[1]
    r = same_layout(y, residual) if residual is not None else y
    scr, shr = (res_scale, res_shift) if res_scale is not None else (scale, shift)
    grid, t = _ew_grid(y.numel() // C, C)
    bn_act_fwd_kernel[grid](y, scale, shift, r, scr, shr, out, y.numel() // C, C, HAS_RES=residual is not None,
                      RES_BN=res_scale is not None, RELU=relu, **t)
    return out


def bn_act_backward(dout, out, y, mean, *, residual=None, res_mean=None):
    """Backward of bn_act_forward's ReLU: dZ = dout [out > 0], plus the BatchNorm reductions per
    channel: rows (sum dZ, sum dZ (y - mean)) and, for a BatchNorm'd residual, sum dZ (r - res_mean)."""
    from .conv3d_triton import bn_act_bwd_kernel

    out = channels_last(out)
    dout, y = same_layout(out, dout), same_layout(out, y)
    dz = torch.empty_like(out, memory_format=torch.channels_last_3d)
    C = out.shape[1]
    rb = res_mean is not None
    st = torch.zeros((3 if rb else 2, C), dtype=torch.float32, device=out.device)
    r, mur = (same_layout(out, residual), res_mean) if rb else (y, mean)
    grid, t = _ew_grid(out.numel() // C, C)
    bn_act_bwd_kernel[grid](dout, out, dz, y, mean, r, mur, st, out.numel() // C, C, RES_BN=rb, **t)
    return dz, st


class _Conv3dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, stride, padding, tiles):
        ctx.save_for_backward(x, w)
        ctx.cfg = (stride, padding, bias is not None, tiles)
        return conv3d_forward(x, w, bias, stride, padding, tiles=tiles)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        stride, padding, has_bias, tiles = ctx.cfg
        dy = channels_last(dy)
        dx = conv3d_dgrad(dy, w, x.shape, stride, padding, x.dtype, tiles=tiles) if ctx.needs_input_grad[0] else None
        dw = conv3d_wgrad(x, dy, w.shape, stride, padding, w.dtype, tiles=tiles) if ctx.needs_input_grad[1] else None
        db = dy.sum(dim=(0, 2, 3, 4)).to(w.dtype) if has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None


def conv3d_triton(x, weight, bias=None, stride=1, padding=0, *, tiles: Optional[TileRule] = None):
    """Drop-in for F.conv3d (no dilation or groups) with Triton forward and backward."""
    return _Conv3dFn.apply(x, weight, bias, triple(stride), triple(padding), tiles)


def _folded(weight, bias, bn, dtype) -> tuple:
    """BN folded into the weight, in the GEMM layout, and the fp32 bias: cached on the weight tensor
    (freed with it) while neither it nor the BN parameters and statistics change (their version
    counters), so that extraction over a cohort does not refold (about 8 small launches per
    convolution)."""
    parts = [weight, bias] + ([bn.weight, bn.bias, bn.running_mean, bn.running_var] if bn is not None else [])
    key = (dtype, bn.eps if bn is not None else None, *((t.data_ptr(), t._version) if t is not None else None for t in parts))
    hit = getattr(weight, "_ctvlp_folded", None)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    w, b = fold_bn(weight, bias, bn) if bn is not None else (weight, bias)
    out = (gemm_weight(w, dtype), b.float().contiguous() if b is not None else None)
    weight._ctvlp_folded = (key, *out)
    return out


@torch.no_grad()
def conv_block_inference(x, weight, bn: Optional[torch.nn.modules.batchnorm._BatchNorm], stride=1, padding=0, *,
                         bias=None, residual=None, relu=True, tiles: Optional[TileRule] = None):
    """Embedding extraction: BN folded into the weights, conv + bias + residual + ReLU in one kernel."""
    wk, b = _folded(weight, bias, bn, x.dtype)
    return conv3d_forward(x, weight, b, stride, padding, residual=residual, relu=relu, wk=wk, tiles=tiles)
