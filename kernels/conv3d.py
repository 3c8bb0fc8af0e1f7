"""Fused 3D convolution for the ResNet image tower: implicit-GEMM Triton kernels, forward and
backward, with the BatchNorm/ReLU/residual work around each convolution folded in.

    conv3d_forward(x, w, bias, stride, padding, *, residual=None, relu=False,
                   in_scale=None, in_shift=None, stats=False) -> y (, moments [2, Cout])
    conv3d_dgrad / conv3d_wgrad(..., bn_bwd=..., relu_bn=..., in_scale=...)  # fused backward
    bn_act_forward / bn_act_backward   # BN + shortcut + ReLU, and its backward's reductions
    conv3d_triton(x, w, bias, stride, padding)   # F.conv3d's signature, with autograd
    conv_block_inference(x, w, bn, stride, padding, residual=None, relu=True)  # BN folded

`model.conv_impl: triton` runs the BatchNorm units of the tower (the residual block and the stem)
through conv3d_block.py, which composes these, and any other convolution through conv3d_triton.
CUDA tensors compile the kernels; CPU tensors need TRITON_INTERPRET=1 (the tests). Outputs come
back in channels_last_3d.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import torch

from ._device import num_sms
from .conv3d_ref import bn_affine, fold_bn, reference_conv3d, update_running_stats

__all__ = ["conv3d_forward", "conv3d_triton", "conv_block_inference", "reference_conv3d", "bn_affine",
           "update_running_stats", "fold_bn", "tile_override", "k_loop", "swap_narrow", "act_l1", "TILE_GRID",
           "SWAP_TILES", "SWAP_NARROW_TILES"]


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * 3


def _prec(dtype: torch.dtype) -> str:
    from .conv3d_triton import INTERPRET

    return "tf32" if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32 else "ieee"


# Tile shapes (BM, BN, BK, num_warps, num_stages) that `ctvlp bench conv` part `tiles` times on
# the GPU, kernel by kernel and layer by layer; _tiles' GPU defaults are chosen from its record
# (benchmarks/results/conv-gpu-20261123T052022.json). Every one is tested for correctness.
TILE_GRID = [(128, 64, 32, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4),
             (128, 128, 32, 4, 4), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 256, 32, 8, 3)]
# Tiles with the GEMM's operands swapped (output channels on the MMA's M side), swept for the
# forward and the dgrad: for 64 output channels (layer1, the stem; the dgrad of layers 1-2) they
# lift compile_report's shared-memory cap from 0.57 (128 x 64, m64n64 MMAs) to 0.67-0.73
# (m64n128), and to 0.8 with one warpgroup over 256 voxels (m64n256); for 128, from 0.89
# (256 x 128) to 1.0 (m64n256). The last, two warpgroups over 512 voxels (cap 0.84; 207-250
# registers, no spill, so one 8-warp CTA per SM, as many warps as two of the 4-warp tile), reads
# layer1's weight through L2 a quarter as often as the 128-voxel default: 14.2 GB per forward
# against 18.8 (bench conv's fwd_l2_bytes). No GPU run yet.
SWAP_TILES = [(128, 64, 64, 4, 3, "swap"), (256, 64, 64, 8, 3, "swap"), (256, 64, 64, 8, 2, "swap"),
              (256, 128, 64, 8, 3, "swap"), (256, 64, 32, 4, 4, "swap"), (512, 64, 32, 8, 3, "swap")]
KINDS = ("fwd", "dgrad", "wgrad")
# SWAP_NARROW's tiles by kind, from compile_report at layer1 (sm_90a, tap loop): the forward's one
# warpgroup (m64n256, cap 0.8, 230 registers, so two CTAs per SM) over the 8-warp 256 x 64 x 64
# (m64n128, cap 0.727, one CTA); the dgrad keeps 8 warps, since with 4 its ReLU/BN epilogue spills.
SWAP_NARROW_TILES = {"fwd": (256, 64, 32, 4, 4, "swap"), "dgrad": (256, 64, 64, 8, 3, "swap")}


def is_swapped(tile: tuple) -> bool:
    """Whether a sweep tile is (BM, BN, BK, num_warps, num_stages, "swap")."""
    return len(tile) > 5


_override: dict[str, tuple] = {}
# The K loop of the forward and the dgrad: "flat" (measured default) decodes (tap, channel) per
# element; "tap" (for reduced channels a multiple of BK) takes each step's tap as scalars (TAP);
# the wgrad's tap form needs Cin a multiple of its N tile (one tap per program). A per-tap nested loop
# was slower on 2026-11-22, when synchronous weight loads were the bottleneck; this one keeps a
# single pipelined loop, and waits for a GPU run (bench conv tower's "tap loop" rows).
K_LOOP = "flat"
# Forward and dgrad launches with at most 64 output channels take SWAP_NARROW_TILES when set;
# off until a GPU run times it (bench conv tower's "swapped" rows).
SWAP_NARROW = False
# The tap-loop forward's activation copies allocate in L1 (l1_copies.py) when set, so that the
# next kw tap's re-reads of nearly the same lines can hit there instead of L2; off until a GPU
# run times it (bench conv tower's "L1" row).
ACT_L1 = False


def _check_loop(mode: str) -> str:
    if mode not in ("flat", "tap"):
        raise ValueError(f"conv3d.K_LOOP must be flat or tap, got {mode!r}")
    return mode


def _tap(channels: int, tile: int, ksize) -> bool:
    """Whether a launch takes its tap form: K_LOOP says "tap", the channels walked per tap are a
    multiple of the tile side that walks them, and each axis's taps fit the int32 tap bits."""
    return _check_loop(K_LOOP) == "tap" and channels % tile == 0 and max(ksize) <= 31


@contextmanager
def k_loop(mode: str):
    """Run the convolutions with this K loop ("flat" or "tap") inside the block."""
    global K_LOOP
    old, K_LOOP = K_LOOP, _check_loop(mode)
    try:
        yield
    finally:
        K_LOOP = old


@contextmanager
def act_l1(on: bool = True):
    """Run the forwards with ACT_L1 set (or cleared) inside the block."""
    global ACT_L1
    old, ACT_L1 = ACT_L1, bool(on)
    try:
        yield
    finally:
        ACT_L1 = old


@contextmanager
def swap_narrow(on: bool = True, fwd_tile: tuple | None = None):
    """Run the convolutions with SWAP_NARROW set (or cleared) inside the block; `fwd_tile` (a
    SWAP_TILES entry) replaces the forward's SWAP_NARROW_TILES entry there, for the tower's rows."""
    global SWAP_NARROW
    if fwd_tile is not None and not is_swapped(fwd_tile):
        raise ValueError(f"swap_narrow: fwd_tile must be a swapped tile (BM, BN, BK, warps, stages, 'swap'), got {fwd_tile}")
    old, SWAP_NARROW = SWAP_NARROW, bool(on)
    old_fwd = SWAP_NARROW_TILES["fwd"]
    SWAP_NARROW_TILES["fwd"] = tuple(fwd_tile or old_fwd)
    try:
        yield
    finally:
        SWAP_NARROW, SWAP_NARROW_TILES["fwd"] = old, old_fwd


@contextmanager
def tile_override(tile: tuple, *kinds: str):
    """Run the `kinds` kernels ("fwd", "dgrad", "wgrad"; all three if none is named) with this
    (BM, BN, BK, num_warps, num_stages[, "swap"]) instead of _tiles' choice, whatever the shape:
    the tile sweep's handle. "swap" (forward and dgrad only) puts the output channels on the
    MMA's M side (conv3d_triton._dot_swappable)."""
    kinds = kinds or KINDS
    bad = set(kinds) - set(KINDS)
    if bad:
        raise ValueError(f"tile_override: kind must be one of {KINDS}, got {sorted(bad)}")
    if len(tile) not in (5, 6) or (is_swapped(tile) and (tile[5] != "swap" or "wgrad" in kinds)):
        raise ValueError(f"tile_override: a tile is (BM, BN, BK, num_warps, num_stages[, 'swap']), and 'swap' is for "
                         f"the fwd and dgrad kinds only; got {tile} for {kinds}")
    _override.update(dict.fromkeys(kinds, tuple(tile)))
    try:
        yield
    finally:
        for kind in kinds:
            _override.pop(kind, None)


def _tiles(kind: str, M: int, N: int, K: int, chan: int = 0) -> dict:
    """The GEMM's tile: M x N output, K reduction, `chan` the channels reduced per tap (Cin in
    the forward, Cout in the dgrad). A tile_override wins. Interpreter: large tiles (its cost is
    per block operation). GPU: the fastest of the H100 sweep (bf16, seed tower, batch 8):
    - 128+ output channels (fwd Cout, dgrad Cin): 256 x 128 x 64, 8 warps (1.3-1.7x over the
      old 128 x 64 x 32 default);
    - narrower: 128 x 64 with BK 64 in the forward; BK 32 in the dgrad unless each tap reduces
      128+ channels (layer2's strided conv: 1.4x);
    - wgrad (M = Cout, N = taps x Cin, K = positions): 128 x 128 x 64, 8 warps from N = 4096;
      128 x 128 x 32, 4 warps, 4 stages from N = 1024 (1.7-1.9x), but 64 x 256 x 32, 8 warps
      for 64 output channels (layer1: 1.1x more); else 128 x 64 x 64.
    Small channel counts (the 1-channel stem) narrow BN and BK. SWAP_NARROW: forwards and dgrads
    with at most 64 output channels take SWAP_NARROW_TILES (swapped, 256 voxels x 64 channels)."""
    from .conv3d_triton import INTERPRET

    if kind in _override:
        tile = _override[kind]
        return dict(zip(("BM", "BN", "BK", "num_warps", "num_stages"), tile), **({"SWAP": True} if is_swapped(tile) else {}))
    swap = {"SWAP": True} if kind != "wgrad" and SWAP_NARROW and N <= 64 else {}
    if INTERPRET:
        return dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=1, **swap)
    bn = 64 if N >= 64 else max(16, 1 << (N - 1).bit_length())
    small_bk = 32 if K >= 32 else 16
    if swap:
        bm, bn_s, bk, warps, stages = SWAP_NARROW_TILES[kind][:5]
        return dict(BM=bm, BN=bn_s, BK=bk if chan >= bk else small_bk, num_warps=warps, num_stages=stages, **swap)
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


def _out_shape(x_shape, w_shape, stride, padding):
    return tuple((i + 2 * p - k) // s + 1 for i, k, s, p in zip(x_shape[2:], w_shape[2:], stride, padding))


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last_3d)


def gemm_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The forward's weight layout [Cout, kd, kh, kw, Cin]: K-contiguous, so its tiles load as
    16-byte vectors."""
    return w.to(dtype).permute(0, 2, 3, 4, 1).contiguous()


def conv3d_forward(x, w, bias=None, stride=1, padding=0, *, residual=None, relu=False, in_scale=None, in_shift=None,
                   stats=False, out_dtype=None, wk=None):
    """y = conv(act_in(x), w) + bias, then optional per-channel stats, + residual, ReLU. `wk`:
    the weight already in gemm_weight's layout and x's dtype (w then only gives the shape)."""
    import triton

    from .conv3d_triton import _conv_fwd

    stride, padding = _triple(stride), _triple(padding)
    Nb, Cin = x.shape[:2]
    Cout = w.shape[0]
    if w.shape[1] != Cin:
        raise ValueError(f"weight expects {w.shape[1]} input channels, input has {Cin}")
    Do, Ho, Wo = _out_shape(x.shape, w.shape, stride, padding)
    y = torch.empty((Nb, Cout, Do, Ho, Wo), dtype=out_dtype or x.dtype, device=x.device,
                    memory_format=torch.channels_last_3d)
    wk = gemm_weight(w, x.dtype) if wk is None else wk
    M, K = Nb * Do * Ho * Wo, w[0].numel()
    t = _tiles("fwd", M, Cout, K, chan=Cin)
    st = torch.empty((triton.cdiv(M, t["BM"]), 2, Cout), dtype=torch.float32, device=x.device) if stats else y
    res = residual if residual is not None else y
    sc = in_scale.float().contiguous() if in_scale is not None else y
    sh = in_shift.float().contiguous() if in_shift is not None else y
    grid = (triton.cdiv(M, t["BM"]), triton.cdiv(Cout, t["BN"]))
    tap = _tap(Cin, t["BK"], w.shape[2:])
    if tap and ACT_L1:
        from .l1_copies import install

        install()  # before the marked kernel can compile
    _conv_fwd[grid](x, wk, y, bias if bias is not None else y, res, sc, sh, st,
                    Nb, Cin, *x.shape[2:], Cout, Do, Ho, Wo, *x.stride(), *y.stride(), *res.stride(),
                    *stride, *padding, *w.shape[2:], HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=relu,
                    STATS_ON=stats, PROLOGUE=in_scale is not None, PREC=_prec(x.dtype), TAP=tap,
                    ACT_CACHE=".ca" if tap and ACT_L1 else "", **t)
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


def conv3d_dgrad(dy, w, x_shape, stride, padding, dtype, *, bn_bwd=None, residual=None, relu_bn=None):
    """Input gradient. Fused, each optional:
    bn_bwd = (y, alpha, beta, gamma): `dy` is the gradient at the next BatchNorm's output, and
        the gradient at the convolution's output, alpha dy + beta y + gamma, is formed on load;
    residual: another gradient of the same input, added;
    relu_bn = (y_in, scale, shift, mean): the input was ReLU(y_in scale + shift); returns the
        gradient at y_in's BatchNorm output and that BatchNorm's reductions [2, Cin]."""
    import triton

    from .conv3d_triton import _conv_dgrad

    Nb, Cin = x_shape[:2]
    Cout = w.shape[0]
    dx = torch.empty(x_shape, dtype=dtype, device=dy.device, memory_format=torch.channels_last_3d)
    wk = w.to(dy.dtype).permute(2, 3, 4, 0, 1).contiguous()  # [kd, kh, kw, Cout, Cin]: Cin-contiguous rows
    yb, al, be, ga = _bn_bwd_args(dy, bn_bwd, dx)
    res = _same_layout(dx, residual) if residual is not None else dx
    if relu_bn is not None:
        yin, sc, sh, mu = _same_layout(dx, relu_bn[0]), *relu_bn[1:]
        st = torch.zeros((2, Cin), dtype=torch.float32, device=dy.device)
    else:
        yin = sc = sh = mu = st = dx
    classes = stride[0] * stride[1] * stride[2]  # parity classes of the input positions
    M = Nb * math.prod(-(-v // s) for v, s in zip(x_shape[2:], stride))
    K = Cout * math.prod(-(-k // s) for k, s in zip(w.shape[2:], stride))  # taps per class, at most
    t = _tiles("dgrad", M, Cin, K, chan=Cout)
    grid = (triton.cdiv(M, t["BM"]), triton.cdiv(Cin, t["BN"]), classes)
    _conv_dgrad[grid](dy, yb, wk, dx, al, be, ga, res, yin, sc, sh, mu, st,
                      Nb, Cin, *x_shape[2:], Cout, *dy.shape[2:], *dy.stride(), *dx.stride(),
                      *stride, *padding, *w.shape[2:], BN_BWD=bn_bwd is not None, HAS_RES=residual is not None,
                      RELU_BN=relu_bn is not None, PREC=_prec(dy.dtype), TAP=_tap(Cout, t["BK"], w.shape[2:]),
                      **t)
    return (dx, st) if relu_bn is not None else dx


def conv3d_wgrad(x, dy, w_shape, stride, padding, dtype, *, bn_bwd=None, in_scale=None, in_shift=None):
    """Weight gradient, fp32 partials over Q slices of the output positions, summed: enough
    programs to fill the chip even when Cout x taps x Cin is small (the deep layers). Fused,
    each optional: bn_bwd as in conv3d_dgrad; in_scale/in_shift, the forward's prologue on x."""
    import triton

    from .conv3d_triton import INTERPRET, _conv_wgrad

    Cout, Cin = w_shape[:2]
    KF = Cin * w_shape[2] * w_shape[3] * w_shape[4]
    P = dy[:, 0].numel()
    t = _tiles("wgrad", Cout, KF, P)
    tiles = triton.cdiv(Cout, t["BM"]) * triton.cdiv(KF, t["BN"])
    want = 2 if INTERPRET else max(1, min(triton.cdiv(4 * num_sms(dy.device), tiles), triton.cdiv(P, 512)))
    p_per = triton.cdiv(triton.cdiv(P, want), t["BK"]) * t["BK"]
    Q = triton.cdiv(P, p_per)
    part = torch.empty((Q, Cout, KF), dtype=torch.float32, device=dy.device)
    xk = x.to(dy.dtype)
    yb, al, be, ga = _bn_bwd_args(dy, bn_bwd, part)
    sc, sh = (in_scale, in_shift) if in_scale is not None else (part, part)
    _conv_wgrad[(triton.cdiv(Cout, t["BM"]), triton.cdiv(KF, t["BN"]), Q)](
        xk, dy, yb, part, al, be, ga, sc, sh, x.shape[0], Cin, *x.shape[2:], Cout, *dy.shape[2:], *xk.stride(),
        *dy.stride(), p_per, *stride, *padding, *w_shape[2:], BN_BWD=bn_bwd is not None,
        PROLOGUE=in_scale is not None, PREC=_prec(dy.dtype), TAP=_tap(Cin, t["BN"], w_shape[2:]), **t)
    # [Cout, (kd, kh, kw, ci)] -> [Cout, ci, kd, kh, kw]
    return part.sum(0).view(Cout, *w_shape[2:], Cin).permute(0, 4, 1, 2, 3).to(dtype)


def _same_layout(like: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A companion tensor read with `like`'s strides: same shape, dense channels_last_3d."""
    if t.shape != like.shape:
        raise ValueError(f"companion tensor has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
    return _cl(t)


def _bn_bwd_args(dy, bn_bwd, dummy):
    if bn_bwd is None:
        return (dummy,) * 4
    y, alpha, beta, gamma = bn_bwd
    return _same_layout(dy, y), alpha, beta, gamma


def _ew_grid(P: int, C: int):
    import triton

    from .conv3d_triton import INTERPRET

    bc = min(64, triton.next_power_of_2(C))
    bp = 64 if INTERPRET else max(16, 4096 // bc)
    return (triton.cdiv(P, bp), triton.cdiv(C, bc)), dict(BP=bp, BC=bc)


def bn_act_forward(y, scale, shift, *, residual=None, res_scale=None, res_shift=None, relu=True):
    """ReLU(y scale + shift + r), r = residual or residual res_scale + res_shift: the block's
    closing BatchNorm, shortcut add and ReLU in one pass (the stem's BatchNorm + ReLU without r)."""
    from .conv3d_triton import _bn_act_fwd

    y = _cl(y)
    out = torch.empty_like(y, memory_format=torch.channels_last_3d)
    C = y.shape[1]
    r = _same_layout(y, residual) if residual is not None else y
    scr, shr = (res_scale, res_shift) if res_scale is not None else (scale, shift)
    grid, t = _ew_grid(y.numel() // C, C)
    _bn_act_fwd[grid](y, scale, shift, r, scr, shr, out, y.numel() // C, C, HAS_RES=residual is not None,
                      RES_BN=res_scale is not None, RELU=relu, **t)
    return out


def bn_act_backward(dout, out, y, mean, *, residual=None, res_mean=None):
    """Backward of bn_act_forward's ReLU: dZ = dout [out > 0], plus the BatchNorm reductions per
    channel: rows (sum dZ, sum dZ (y - mean)) and, for a BatchNorm'd residual, sum dZ (r - res_mean)."""
    from .conv3d_triton import _bn_act_bwd

    out = _cl(out)
    dout, y = _same_layout(out, dout), _same_layout(out, y)
    dz = torch.empty_like(out, memory_format=torch.channels_last_3d)
    C = out.shape[1]
    rb = res_mean is not None
    st = torch.zeros((3 if rb else 2, C), dtype=torch.float32, device=out.device)
    r, mur = (_same_layout(out, residual), res_mean) if rb else (y, mean)
    grid, t = _ew_grid(out.numel() // C, C)
    _bn_act_bwd[grid](dout, out, dz, y, mean, r, mur, st, out.numel() // C, C, RES_BN=rb, **t)
    return dz, st


class _Conv3dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, stride, padding):
        ctx.save_for_backward(x, w)
        ctx.cfg = (stride, padding, bias is not None)
        return conv3d_forward(x, w, bias, stride, padding)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        stride, padding, has_bias = ctx.cfg
        dy = _cl(dy)
        dx = conv3d_dgrad(dy, w, x.shape, stride, padding, x.dtype) if ctx.needs_input_grad[0] else None
        dw = conv3d_wgrad(x, dy, w.shape, stride, padding, w.dtype) if ctx.needs_input_grad[1] else None
        db = dy.sum(dim=(0, 2, 3, 4)).to(w.dtype) if has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


def conv3d_triton(x, weight, bias=None, stride=1, padding=0):
    """Drop-in for F.conv3d (no dilation or groups) with Triton forward and backward."""
    return _Conv3dFn.apply(x, weight, bias, _triple(stride), _triple(padding))


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
                         bias=None, residual=None, relu=True):
    """Embedding extraction: BN folded into the weights, conv + bias + residual + ReLU in one kernel."""
    wk, b = _folded(weight, bias, bn, x.dtype)
    return conv3d_forward(x, weight, b, stride, padding, residual=residual, relu=relu, wk=wk)
