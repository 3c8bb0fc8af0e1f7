"""Triton kernels of the 3D convolution as implicit GEMMs (see conv3d_ref.py for the math).

All three are one GEMM whose operand rows are gathered on the fly, never an im2col buffer:
- forward: M = output positions (N Do Ho Wo), N = Cout, K = taps x Cin;
- dgrad (input gradient, the transposed convolution): M = input positions, N = Cin,
  K = taps x Cout, where a tap contributes only if (i + pad - k) is a multiple of the stride;
- wgrad: M = Cout, N = taps x Cin, K = output positions, split over programs.
K is flattened as (tap, channel), so a 1-channel stem (K = 343 for 7^3) wastes no lanes on
padding channels. The weight comes in the GEMM's own layout, so its tile loads are contiguous,
vectorised and pipelined (cp.async) like the activations': [Cout, taps x Cin] for the forward,
[taps, Cout, Cin] for the dgrad (conv3d.py permutes it; the weights are small). Any strides are
accepted; channels_last_3d inputs (channel stride 1) give contiguous loads along K.
The forward's epilogue adds bias, gathers per-channel batch statistics for the next BatchNorm
(each row tile's sum and centred sum of squares, merged in fp32 by Chan's rule: deterministic,
and exact enough when |mean| >> std, where E[y^2] - mean^2 would cancel), adds a residual and
applies ReLU; the dgrad's adds another gradient and applies the previous BatchNorm's ReLU mask
with that BatchNorm's two reductions. BatchNorm maps on an operand are applied by elementwise
passes (conv3d_block.py), never in the GEMMs' loads, which cost each GEMM 2-2.8x on an H100.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def split_k(k, C, KH: tl.constexpr, KW: tl.constexpr):
    """Flat K index -> (kd, kh, kw, channel)."""
    c = k % C
    tap = k // C
    kw = tap % KW
    kh = (tap // KW) % KH
    kd = tap // (KW * KH)
    return kd, kh, kw, c


@triton.jit
def split_m(m, D, H, W):
    """Flat position index over (n, d, h, w) -> its four coordinates."""
    w = m % W
    t = m // W
    h = t % H
    t = t // H
    return t // D, t % D, h, w


@triton.jit
def in_tap(od, oh, ow, kd, kh, kw, Di, Hi, Wi, sxd, sxh, sxw, SD: tl.constexpr, SH: tl.constexpr,
           SW: tl.constexpr, PD, PH, PW):
    """Input voxels that output positions (rows) read through taps (columns): the spatial part
    of their address and whether each lies inside the volume (outside: zero padding)."""
    idd = od[:, None] * SD - PD + kd[None, :]
    ihh = oh[:, None] * SH - PH + kh[None, :]
    iww = ow[:, None] * SW - PW + kw[None, :]
    inb = (idd >= 0) & (idd < Di) & (ihh >= 0) & (ihh < Hi) & (iww >= 0) & (iww < Wi)
    return idd * sxd + ihh * sxh + iww * sxw, inb


@triton.jit
def fwd_step_tiles(X, Wt, k0, K, Cin, n, od, oh, ow, mmask, co, comask, Di, Hi, Wi, sxn, sxc, sxd, sxh, sxw,
                   SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PD, PH, PW, KH: tl.constexpr, KW: tl.constexpr,
                   BK: tl.constexpr):
    """One flat K step of the forward: the activation tile [rows, BK] over (tap, channel) columns,
    zero where a tap falls in the padding, and the weight tile [BK, channels]."""
    k = k0 + tl.arange(0, BK)
    kmask = k < K
    kd, kh, kw, ci = split_k(k, Cin, KH, KW)
    sp, inb = in_tap(od, oh, ow, kd, kh, kw, Di, Hi, Wi, sxd, sxh, sxw, SD, SH, SW, PD, PH, PW)
    a = tl.load(X + n[:, None] * sxn + ci[None, :] * sxc + sp, mask=inb & mmask[:, None] & kmask[None, :], other=0.0)
    b = tl.load(Wt + co[None, :] * K + k[:, None], mask=kmask[:, None] & comask[None, :], other=0.0)
    return a, b


@triton.jit
def fwd_epilogue(acc, Y, BIAS, RES, STATS, pid_m, M, Cout, co, comask, mmask, n, od, oh, ow,
                 syn, syc, syd, syh, syw, srn, src, srd, srh, srw,
                 HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, STATS_ON: tl.constexpr,
                 BM: tl.constexpr):
    """acc [rows, channels] + bias, its batch statistics, + residual, ReLU, stored to Y."""
    if HAS_BIAS:
        acc += tl.load(BIAS + co, mask=comask, other=0.0).to(tl.float32)[None, :]
    valid = mmask[:, None] & comask[None, :]
    if STATS_ON:  # this tile's share of the next BatchNorm's batch statistics: its sum and its
        # centred sum of squares, stored per row tile and merged by Chan's rule (conv3d.merge_moments)
        s = tl.sum(tl.where(valid, acc, 0.0), 0)
        dev = tl.where(valid, acc - (s / tl.minimum(M - pid_m * BM, BM).to(tl.float32))[None, :], 0.0)
        tl.store(STATS + pid_m * 2 * Cout + co, s, mask=comask)
        tl.store(STATS + pid_m * 2 * Cout + Cout + co, tl.sum(dev * dev, 0), mask=comask)
    if HAS_RES:
        r_off = n[:, None] * srn + co[None, :] * src + od[:, None] * srd + oh[:, None] * srh + ow[:, None] * srw
        acc += tl.load(RES + r_off, mask=valid, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y_off = n[:, None] * syn + co[None, :] * syc + od[:, None] * syd + oh[:, None] * syh + ow[:, None] * syw
    tl.store(Y + y_off, acc.to(Y.dtype.element_ty), mask=valid)


@triton.jit
def conv_fwd_kernel(X, Wt, Y, BIAS, RES, STATS,
              Nb, Cin, Di, Hi, Wi, Cout, Do, Ho, Wo,
              sxn, sxc, sxd, sxh, sxw,
              syn, syc, syd, syh, syw, srn, src, srd, srh, srw,
              SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PD, PH, PW,
              KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, STATS_ON: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Y = conv(X, W) over a flat (tap, channel) K loop, then fwd_epilogue."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    M = Nb * Do * Ho * Wo
    K = KD * KH * KW * Cin
    m = pid_m * BM + tl.arange(0, BM)
    mmask = m < M
    n, od, oh, ow = split_m(m, Do, Ho, Wo)
    co = pid_n * BN + tl.arange(0, BN)
    comask = co < Cout
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        a, b = fwd_step_tiles(X, Wt, k0, K, Cin, n, od, oh, ow, mmask, co, comask, Di, Hi, Wi, sxn, sxc, sxd, sxh, sxw,
                              SD, SH, SW, PD, PH, PW, KH, KW, BK)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    fwd_epilogue(acc, Y, BIAS, RES, STATS, pid_m, M, Cout, co, comask, mmask, n, od, oh, ow,
                 syn, syc, syd, syh, syw, srn, src, srd, srh, srw, HAS_BIAS, HAS_RES, RELU, STATS_ON, BM)


@triton.jit
def dgrad_classes(pid_m, Nb, Di, Hi, Wi, Cout, SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PD, PH, PW,
                  KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BM: tl.constexpr):
    """The dgrad program's parity class (program_id(2)) and rows: the class's first tap per axis
    (k0 + s t reach an output, t < nt), the output offset c of tap 0 (o = j + c - t), the rows'
    coordinates (j, and the input position i = r + s j) and K = the class's taps x Cout."""
    cls = tl.program_id(2)
    rd, rh, rw = cls // (SH * SW), (cls // SW) % SH, cls % SW
    kd0, kh0, kw0 = (rd + PD) % SD, (rh + PH) % SH, (rw + PW) % SW
    ntd, nth, ntw = tl.cdiv(KD - kd0, SD), tl.cdiv(KH - kh0, SH), tl.cdiv(KW - kw0, SW)
    cd, ch, cw = (rd + PD - kd0) // SD, (rh + PH - kh0) // SH, (rw + PW - kw0) // SW
    Dq, Hq, Wq = tl.cdiv(Di, SD), tl.cdiv(Hi, SH), tl.cdiv(Wi, SW)
    M = Nb * Dq * Hq * Wq
    m = pid_m * BM + tl.arange(0, BM)
    n, jd, jh, jw = split_m(m, Dq, Hq, Wq)
    i_d, i_h, i_w = rd + SD * jd, rh + SH * jh, rw + SW * jw
    mmask = (m < M) & (i_d < Di) & (i_h < Hi) & (i_w < Wi)
    return (kd0, kh0, kw0, ntd, nth, ntw, cd, ch, cw, n, jd, jh, jw, i_d, i_h, i_w, mmask,
            ntd * nth * ntw * Cout)


@triton.jit
def dgrad_step_tiles(DY, Wt, k0, K, Cin, Cout, Do, Ho, Wo, n, jd, jh, jw, mmask, ci, cimask, kd0, kh0, kw0, nth, ntw,
                     cd, ch, cw, syn, syc, syd, syh, syw, SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                     KH: tl.constexpr, KW: tl.constexpr, BK: tl.constexpr):
    """One flat K step of the dgrad over the class's (tap, output channel) columns: the dY tile
    [rows, BK], zero where a tap reaches no output, and the weight tile [BK, input channels]."""
    k = k0 + tl.arange(0, BK)
    kmask = k < K
    co = k % Cout
    tap = k // Cout
    tw = tap % ntw
    th = (tap // ntw) % nth
    td = tap // (ntw * nth)
    kd, kh, kw = kd0 + SD * td, kh0 + SH * th, kw0 + SW * tw
    odd = jd[:, None] + cd - td[None, :]
    ohh = jh[:, None] + ch - th[None, :]
    oww = jw[:, None] + cw - tw[None, :]
    ok = (odd >= 0) & (ohh >= 0) & (oww >= 0) & (odd < Do) & (ohh < Ho) & (oww < Wo)
    ok = ok & mmask[:, None] & kmask[None, :]
    a = tl.load(DY + n[:, None] * syn + co[None, :] * syc + odd * syd + ohh * syh + oww * syw, mask=ok, other=0.0)
    row = ((kd * KH + kh) * KW + kw) * Cout + co  # in the [taps, Cout, Cin] weight: rows of Cin
    b = tl.load(Wt + row[:, None] * Cin + ci[None, :], mask=kmask[:, None] & cimask[None, :], other=0.0)
    return a, b


@triton.jit
def dgrad_epilogue(acc, DX, RES, YIN, SC_IN, SH_IN, MU_IN, STATS, Cin, ci, cimask, mmask, n, i_d, i_h, i_w,
                   sxn, sxc, sxd, sxh, sxw, HAS_RES: tl.constexpr, RELU_BN: tl.constexpr):
    """acc [rows, input channels] + RES, then the previous BatchNorm's ReLU mask with its two
    reductions per channel (RELU_BN), stored to DX."""
    x_off = n[:, None] * sxn + ci[None, :] * sxc + i_d[:, None] * sxd + i_h[:, None] * sxh + i_w[:, None] * sxw
    valid = mmask[:, None] & cimask[None, :]
    if HAS_RES:
        acc += tl.load(RES + x_off, mask=valid, other=0.0).to(tl.float32)
    if RELU_BN:
        yin = tl.load(YIN + x_off, mask=valid, other=0.0).to(tl.float32)
        sc = tl.load(SC_IN + ci, mask=cimask, other=0.0)
        sh = tl.load(SH_IN + ci, mask=cimask, other=0.0)
        mu = tl.load(MU_IN + ci, mask=cimask, other=0.0)
        acc = tl.where(valid & (yin * sc[None, :] + sh[None, :] > 0), acc, 0.0)
        tl.atomic_add(STATS + ci, tl.sum(acc, 0), mask=cimask)
        tl.atomic_add(STATS + Cin + ci, tl.sum(acc * (yin - mu[None, :]), 0), mask=cimask)
    tl.store(DX + x_off, acc.to(DX.dtype.element_ty), mask=valid)


@triton.jit
def conv_dgrad_kernel(DY, Wt, DX, RES, YIN, SC_IN, SH_IN, MU_IN, STATS,
                Nb, Cin, Di, Hi, Wi, Cout, Do, Ho, Wo,
                syn, syc, syd, syh, syw, sxn, sxc, sxd, sxh, sxw,
                SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PD, PH, PW,
                KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                HAS_RES: tl.constexpr, RELU_BN: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """dX[n, ci, i] = sum over taps k and co of dY[n, co, (i + p - k) / s] W[co, ci, k].

    Strided convolutions are split by the parity class of the input position (i mod s, the
    grid's third axis): within a class the taps that reach an output are a fixed sub-lattice
    (k = k0 + s t), so the K loop runs over those alone, not over all taps with most masked
    (3^3 stride 2: 3.4 taps on average instead of 27). Then dgrad_epilogue: + RES (another
    gradient of the same input), and the backward of the previous BatchNorm's ReLU, dX *=
    [YIN * scale + shift > 0], with that BatchNorm's two reductions (RELU_BN). RES and YIN have
    DX's layout."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    (kd0, kh0, kw0, ntd, nth, ntw, cd, ch, cw, n, jd, jh, jw, i_d, i_h, i_w, mmask,
     K) = dgrad_classes(pid_m, Nb, Di, Hi, Wi, Cout, SD, SH, SW, PD, PH, PW, KD, KH, KW, BM)
    ci = pid_n * BN + tl.arange(0, BN)
    cimask = ci < Cin
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        a, b = dgrad_step_tiles(DY, Wt, k0, K, Cin, Cout, Do, Ho, Wo, n, jd, jh, jw, mmask, ci, cimask, kd0, kh0, kw0,
                                nth, ntw, cd, ch, cw, syn, syc, syd, syh, syw, SD, SH, SW, KH, KW, BK)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    dgrad_epilogue(acc, DX, RES, YIN, SC_IN, SH_IN, MU_IN, STATS, Cin, ci, cimask, mmask, n, i_d, i_h, i_w,
                   sxn, sxc, sxd, sxh, sxw, HAS_RES, RELU_BN)


@triton.jit
def wgrad_step_tiles(X, DY, p0, p_lo, P_PER, P, co, comask, kd, kh, kw, ci, fmask, Do, Ho, Wo, Di, Hi, Wi,
                     sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw, SD: tl.constexpr, SH: tl.constexpr,
                     SW: tl.constexpr, PD, PH, PW, BK: tl.constexpr):
    """One K step of the wgrad over BK output positions: the dY tile [output channels, BK] and the
    input tile [BK, (tap, channel) columns], zero where a tap falls in the padding."""
    p = p0 + tl.arange(0, BK)
    pmask = (p < P) & (p < p_lo + P_PER)
    n, od, oh, ow = split_m(p, Do, Ho, Wo)
    a = tl.load(DY + co[:, None] * syc + (n * syn + od * syd + oh * syh + ow * syw)[None, :],
                mask=comask[:, None] & pmask[None, :], other=0.0)
    sp, inb = in_tap(od, oh, ow, kd, kh, kw, Di, Hi, Wi, sxd, sxh, sxw, SD, SH, SW, PD, PH, PW)
    b = tl.load(X + n[:, None] * sxn + ci[None, :] * sxc + sp, mask=inb & pmask[:, None] & fmask[None, :], other=0.0)
    return a, b


@triton.jit
def conv_wgrad_kernel(X, DY, DW, Nb, Cin, Di, Hi, Wi, Cout, Do, Ho, Wo,
                sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw, P_PER,
                SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PD, PH, PW,
                KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Partial dW[co, (tap, ci)] over output positions [q P_PER, (q+1) P_PER) into slot q of an
    fp32 [Q, Cout, taps * Cin] buffer (summed afterwards: deterministic, no atomics)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    q = tl.program_id(2)
    P = Nb * Do * Ho * Wo
    KF = KD * KH * KW * Cin
    co = pid_m * BM + tl.arange(0, BM)
    comask = co < Cout
    f = pid_n * BN + tl.arange(0, BN)
    fmask = f < KF
    kd, kh, kw, ci = split_k(f, Cin, KH, KW)
    acc = tl.zeros((BM, BN), tl.float32)
    p_lo = q * P_PER
    for p0 in range(p_lo, tl.minimum(p_lo + P_PER, P), BK):
        a, b = wgrad_step_tiles(X, DY, p0, p_lo, P_PER, P, co, comask, kd, kh, kw, ci, fmask, Do, Ho, Wo, Di, Hi, Wi,
                                sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw, SD, SH, SW, PD, PH, PW, BK)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    tl.store(DW + q * Cout * KF + co[:, None] * KF + f[None, :], acc, mask=comask[:, None] & fmask[None, :])


@triton.jit
def bn_act_fwd_kernel(Y, SC, SH, R, SCR, SHR, OUT, P, C, HAS_RES: tl.constexpr, RES_BN: tl.constexpr,
                RELU: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    """OUT = ReLU(Y * scale + shift + residual), residual = R or R * scale_r + shift_r (the
    downsample's BatchNorm). Tensors are dense [P, C] (channels_last_3d)."""
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = c < C
    mask = (p < P)[:, None] & cmask[None, :]
    off = p[:, None] * C + c[None, :]
    sc = tl.load(SC + c, mask=cmask, other=0.0)
    sh = tl.load(SH + c, mask=cmask, other=0.0)
    v = tl.load(Y + off, mask=mask, other=0.0).to(tl.float32) * sc[None, :] + sh[None, :]
    if HAS_RES:
        r = tl.load(R + off, mask=mask, other=0.0).to(tl.float32)
        if RES_BN:
            r = r * tl.load(SCR + c, mask=cmask, other=0.0)[None, :] + tl.load(SHR + c, mask=cmask, other=0.0)[None, :]
        v += r
    if RELU:
        v = tl.maximum(v, 0.0)
    tl.store(OUT + off, v.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def bn_act_bwd_kernel(DOUT, OUT, DZ, Y, MU, R, MUR, STATS, P, C, RES_BN: tl.constexpr, BP: tl.constexpr,
                BC: tl.constexpr):
    """Backward of bn_act_fwd_kernel's ReLU, dZ = dOUT [OUT > 0], with the BatchNorm backward's two
    reductions per channel into STATS rows 0 and 1 (sum dZ, sum dZ (Y - mean)) and, for a
    BatchNorm'd residual, row 2 (sum dZ (R - mean_r))."""
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = c < C
    mask = (p < P)[:, None] & cmask[None, :]
    off = p[:, None] * C + c[None, :]
    live = tl.load(OUT + off, mask=mask, other=0.0) > 0
    dz = tl.where(mask & live, tl.load(DOUT + off, mask=mask, other=0.0).to(tl.float32), 0.0)
    tl.store(DZ + off, dz.to(DZ.dtype.element_ty), mask=mask)
    y = tl.load(Y + off, mask=mask, other=0.0).to(tl.float32) - tl.load(MU + c, mask=cmask, other=0.0)[None, :]
    tl.atomic_add(STATS + c, tl.sum(dz, 0), mask=cmask)
    tl.atomic_add(STATS + C + c, tl.sum(dz * y, 0), mask=cmask)
    if RES_BN:
        r = tl.load(R + off, mask=mask, other=0.0).to(tl.float32) - tl.load(MUR + c, mask=cmask, other=0.0)[None, :]
        tl.atomic_add(STATS + 2 * C + c, tl.sum(dz * r, 0), mask=cmask)
