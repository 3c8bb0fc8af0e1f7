"""Triton kernels of the 3D convolution as implicit GEMMs (see conv3d_ref.py for the math).

All three are one GEMM whose operand rows are gathered on the fly, never an im2col buffer:
- forward: M = output positions (N Do Ho Wo), N = Cout, K = taps x Cin;
- dgrad (input gradient, the transposed convolution): M = input positions, N = Cin,
  K = taps x Cout, where a tap contributes only if (i + pad - k) is a multiple of the stride;
- wgrad: M = Cout, N = taps x Cin, K = output positions, split over programs.
K is flattened as (tap, channel), so a 1-channel stem (K = 343 for 7^3) wastes no lanes on
padding channels. The weight comes in the GEMM's own layout, so its tile loads are contiguous,
vectorised and pipelined (cp.async) like the activations': [Cout, taps x Cin] for the forward,
[taps, Cout, Cin] for the dgrad (conv3d.py permutes it; the weights are small). In the torch
layout [Cout, Cin, kd, kh, kw] every element of the tile was a scalar load, synchronous, the
tensor cores waiting on it (seen in the sm_90 TTGIR: benchmarks/ptx_report.py). Any strides are accepted; channels_last_3d inputs (channel stride 1) give
contiguous loads along K. The forward's optional prologue applies a per-input-channel affine
map and ReLU while loading (the previous BatchNorm, never written out), and its epilogue adds
bias, gathers per-channel batch statistics for the next BatchNorm (each row tile's sum and
centred sum of squares, merged in fp32 by Chan's rule: deterministic, and exact enough when
|mean| >> std, where E[y^2] - mean^2 would cancel), adds a residual and applies ReLU.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _split_k(k, C, KH: tl.constexpr, KW: tl.constexpr):
    """Flat K index -> (kd, kh, kw, channel)."""
    c = k % C
    tap = k // C
    kw = tap % KW
    kh = (tap // KW) % KH
    kd = tap // (KW * KH)
    return kd, kh, kw, c


@triton.jit
def _split_m(m, D, H, W):
    """Flat position index over (n, d, h, w) -> its four coordinates."""
    w = m % W
    t = m // W
    h = t % H
    t = t // H
    return t // D, t % D, h, w


@triton.jit
def _in_tap(od, oh, ow, kd, kh, kw, Di, Hi, Wi, sxd, sxh, sxw, SD: tl.constexpr, SH: tl.constexpr,
            SW: tl.constexpr, PD, PH, PW):
    """Input voxels that output positions (rows) read through taps (columns): the spatial part
    of their address and whether each lies inside the volume (outside: zero padding)."""
    idd = od[:, None] * SD - PD + kd[None, :]
    ihh = oh[:, None] * SH - PH + kh[None, :]
    iww = ow[:, None] * SW - PW + kw[None, :]
    inb = (idd >= 0) & (idd < Di) & (ihh >= 0) & (ihh < Hi) & (iww >= 0) & (iww < Wi)
    return idd * sxd + ihh * sxh + iww * sxw, inb


@triton.jit
def _tap_bits(x0, size, KS: tl.constexpr, STEP: tl.constexpr = 1):
    """Bit t set where x0 + STEP t lies in [0, size), for the KS taps of one axis (KS <= 31);
    unsigned compares, so a negative coordinate wraps above the bound."""
    bits = tl.zeros_like(x0)
    for t in tl.static_range(KS):
        bits |= ((x0 + STEP * t).to(tl.uint32, bitcast=True) < size).to(tl.int32) << t
    return bits


@triton.jit
def _row_tap_bits(xd, xh, xw, Sd, Sh, Sw, rmask, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                  STEP: tl.constexpr):
    """Each row's tap bits for the three axes (_tap_bits), none for rows outside the GEMM: a K
    step then tests three bits rather than adding and comparing three coordinates."""
    return (tl.where(rmask, _tap_bits(xd, Sd, KD, STEP), 0), _tap_bits(xh, Sh, KH, STEP),
            _tap_bits(xw, Sw, KW, STEP))


@triton.jit
def _next_step(c0, t_out, t_mid, t_in, C, N_MID, N_IN, BK: tl.constexpr):
    """A tap loop's next K step without division: the channel chunk c0 advances by BK through C
    channels, then the tap (t_out, t_mid, t_in), innermost first, like an odometer."""
    c0 += BK
    nxt = c0 == C
    c0 = tl.where(nxt, 0, c0)
    t_in = tl.where(nxt, t_in + 1, t_in)
    nxt = t_in == N_IN
    t_in = tl.where(nxt, 0, t_in)
    t_mid = tl.where(nxt, t_mid + 1, t_mid)
    nxt = t_mid == N_MID
    t_mid = tl.where(nxt, 0, t_mid)
    t_out = tl.where(nxt, t_out + 1, t_out)
    return c0, t_out, t_mid, t_in


@triton.jit
def _bn_relu_prologue(a, amask, SC_IN, SH_IN, ci, kmask):
    """The previous BatchNorm + ReLU applied to an input tile as it is loaded (channels ci along
    axis 1); zero padding stays zero."""
    sc = tl.load(SC_IN + ci, mask=kmask, other=0.0)
    sh = tl.load(SH_IN + ci, mask=kmask, other=0.0)
    return tl.where(amask, tl.maximum(a.to(tl.float32) * sc[None, :] + sh[None, :], 0.0), 0.0).to(a.dtype)


@triton.jit
def _dot_swappable(a, b, acc, PREC: tl.constexpr, SWAP: tl.constexpr):
    """acc += a b for an activation tile a [rows, BK] and a weight tile b [BK, channels]; SWAP:
    acc^T += b^T a^T, the channels as the MMA's M side. An MMA (wgmma) reads its operands from
    shared memory for every 64 rows of M: with 64 channels on the N side, the unswapped tile
    re-reads the weight tile per 64 rows, and the K step is capped by shared-memory bandwidth
    (compile_report's smem_cap); swapped, each operand is read once and the rows' side can be
    256 wide."""
    if SWAP:
        acc = tl.dot(tl.trans(b), tl.trans(a), acc, input_precision=PREC)
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _conv_fwd(X, Wt, Y, BIAS, RES, SC_IN, SH_IN, STATS,
              Nb, Cin, Di, Hi, Wi, Cout, Do, Ho, Wo,
              sxn, sxc, sxd, sxh, sxw,
              syn, syc, syd, syh, syw, srn, src, srd, srh, srw,
              SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PD, PH, PW,
              KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, STATS_ON: tl.constexpr,
              PROLOGUE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
              TAP: tl.constexpr = False, SWAP: tl.constexpr = False, ACT_CACHE: tl.constexpr = ""):
    """TAP (Cin a multiple of BK): each K step lies within one tap, so the tap's coordinates are
    scalars and the A tile's address and padding mask are a row vector plus a channel range,
    instead of a (row, k) grid of divisions and compares (one flat loop still, pipelined).
    SWAP: the transposed product, Y^T = W X^T, with the output channels as the MMA's M side
    (_dot_swappable). ACT_CACHE ".ca" (tap loop) marks the activation copies for L1, where the
    next kw tap re-reads nearly the same lines (l1_copies.py makes the PTX do so)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    M = Nb * Do * Ho * Wo
    K = KD * KH * KW * Cin
    m = pid_m * BM + tl.arange(0, BM)
    mmask = m < M
    n, od, oh, ow = _split_m(m, Do, Ho, Wo)
    co = pid_n * BN + tl.arange(0, BN)
    comask = co < Cout
    if SWAP:
        acc = tl.zeros((BN, BM), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    if TAP:
        # the rows' corner voxel (tap 0) is loop-invariant; the tap (kd, kh, kw) and channel chunk
        # c0 advance by counters, with no division in the loop
        d0 = od * SD - PD
        h0 = oh * SH - PH
        w0 = ow * SW - PW
        row0 = X + n * sxn + d0 * sxd + h0 * sxh + w0 * sxw
        # which taps of each axis stay inside the volume
        dbits, hbits, wbits = _row_tap_bits(d0, h0, w0, Di, Hi, Wi, mmask, KD, KH, KW, 1)
        c0 = pid_m * 0
        kd = c0
        kh = c0
        kw = c0
        for k0 in range(0, K, BK):
            rin = ((dbits >> kd) & (hbits >> kh) & (wbits >> kw) & 1) != 0
            ci = c0 + tl.arange(0, BK)
            # the tap's offset joins the channel offsets (one vector per thread), so each row costs
            # one address add
            a = tl.load(row0[:, None] + ((kd * sxd + kh * sxh + kw * sxw) + ci * sxc)[None, :], mask=rin[:, None],
                        other=0.0, cache_modifier=ACT_CACHE)
            if PROLOGUE:
                a = _bn_relu_prologue(a, rin[:, None], SC_IN, SH_IN, ci, ci < Cin)
            b = tl.load(Wt + co[None, :] * K + (k0 + tl.arange(0, BK))[:, None], mask=comask[None, :], other=0.0)
            acc = _dot_swappable(a, b, acc, PREC, SWAP)
            c0, kd, kh, kw = _next_step(c0, kd, kh, kw, Cin, KH, KW, BK)
    else:
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            kmask = k < K
            kd, kh, kw, ci = _split_k(k, Cin, KH, KW)
            sp, inb = _in_tap(od, oh, ow, kd, kh, kw, Di, Hi, Wi, sxd, sxh, sxw, SD, SH, SW, PD, PH, PW)
            amask = inb & mmask[:, None] & kmask[None, :]
            a = tl.load(X + n[:, None] * sxn + ci[None, :] * sxc + sp, mask=amask, other=0.0)
            if PROLOGUE:
                a = _bn_relu_prologue(a, amask, SC_IN, SH_IN, ci, kmask)
            b = tl.load(Wt + co[None, :] * K + k[:, None], mask=kmask[:, None] & comask[None, :], other=0.0)
            acc = _dot_swappable(a, b, acc, PREC, SWAP)
    if SWAP:
        acc = tl.trans(acc)
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
def _bn_bwd_prologue(dz, y, ok, co, cmask, AL, BE, GA):
    """The BatchNorm backward on the fly: dY = alpha * dZ + beta * Y + gamma per channel (columns:
    co along axis 1), zero where the load was masked. The coefficients come from the two batch
    reductions (conv3d_block.bn_backward_coefs)."""
    al = tl.load(AL + co, mask=cmask, other=0.0)
    be = tl.load(BE + co, mask=cmask, other=0.0)
    ga = tl.load(GA + co, mask=cmask, other=0.0)
    return tl.where(ok, dz.to(tl.float32) * al + y.to(tl.float32) * be + ga, 0.0)


@triton.jit
def _conv_dgrad(DY, YB, Wt, DX, AL, BE, GA, RES, YIN, SC_IN, SH_IN, MU_IN, STATS,
                Nb, Cin, Di, Hi, Wi, Cout, Do, Ho, Wo,
                syn, syc, syd, syh, syw, sxn, sxc, sxd, sxh, sxw,
                SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PD, PH, PW,
                KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                BN_BWD: tl.constexpr, HAS_RES: tl.constexpr, RELU_BN: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, TAP: tl.constexpr = False,
                SWAP: tl.constexpr = False):
    """dX[n, ci, i] = sum over taps k and co of dY[n, co, (i + p - k) / s] W[co, ci, k].

    Strided convolutions are split by the parity class of the input position (i mod s, the
    grid's third axis): within a class the taps that reach an output are a fixed sub-lattice
    (k = k0 + s t), so the K loop runs over those alone, not over all taps with most masked
    (3^3 stride 2: 3.4 taps on average instead of 27).

    Fused, each optional: dY formed from (dZ, Y) by the BatchNorm backward while loading (BN_BWD);
    + RES (another gradient of the same input); then the backward of the previous BatchNorm's ReLU,
    dX *= [YIN * scale + shift > 0], with that BatchNorm's two reductions (sum dX, sum dX (YIN -
    mean)) accumulated per channel (RELU_BN). RES and YIN have DX's layout; YB has DY's.
    TAP (Cout a multiple of BK): as in the forward, the class's tap advances by counters and each
    K step's dY rows are a hoisted base plus a scalar offset. SWAP: dX^T = W^T dY^T, the input
    channels as the MMA's M side (_dot_swappable)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cls = tl.program_id(2)
    rd, rh, rw = cls // (SH * SW), (cls // SW) % SH, cls % SW
    # the class's taps per dimension: k0 + s t for t < nt; output index o = j + c - t
    kd0, kh0, kw0 = (rd + PD) % SD, (rh + PH) % SH, (rw + PW) % SW
    ntd, nth, ntw = tl.cdiv(KD - kd0, SD), tl.cdiv(KH - kh0, SH), tl.cdiv(KW - kw0, SW)
    cd, ch, cw = (rd + PD - kd0) // SD, (rh + PH - kh0) // SH, (rw + PW - kw0) // SW
    Dq, Hq, Wq = tl.cdiv(Di, SD), tl.cdiv(Hi, SH), tl.cdiv(Wi, SW)
    M = Nb * Dq * Hq * Wq
    K = ntd * nth * ntw * Cout
    m = pid_m * BM + tl.arange(0, BM)
    n, jd, jh, jw = _split_m(m, Dq, Hq, Wq)
    i_d, i_h, i_w = rd + SD * jd, rh + SH * jh, rw + SW * jw
    mmask = (m < M) & (i_d < Di) & (i_h < Hi) & (i_w < Wi)
    ci = pid_n * BN + tl.arange(0, BN)
    cimask = ci < Cin
    if SWAP:
        acc = tl.zeros((BN, BM), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    if TAP:
        # output coordinates at the class's tap 0, hoisted; (td, th, tw) and the channel chunk c0
        # advance by counters
        o_d, o_h, o_w = jd + cd, jh + ch, jw + cw
        base = n * syn + o_d * syd + o_h * syh + o_w * syw
        # which of the class's taps reach an output (o - t inside dY)
        dbits, hbits, wbits = _row_tap_bits(o_d, o_h, o_w, Do, Ho, Wo, mmask, KD, KH, KW, -1)
        c0 = pid_m * 0
        td = c0
        th = c0
        tw = c0
        for k0 in range(0, K, BK):
            co = c0 + tl.arange(0, BK)
            kmask = co < Cout  # all true
            ok = (((dbits >> td) & (hbits >> th) & (wbits >> tw) & 1) != 0)[:, None]
            dy_off = base[:, None] + (co * syc - (td * syd + th * syh + tw * syw))[None, :]
            a = tl.load(DY + dy_off, mask=ok, other=0.0)
            if BN_BWD:
                yb = tl.load(YB + dy_off, mask=ok, other=0.0)
                a = _bn_bwd_prologue(a, yb, ok, co[None, :], kmask[None, :], AL, BE, GA).to(DY.dtype.element_ty)
            row = (((kd0 + SD * td) * KH + kh0 + SH * th) * KW + kw0 + SW * tw) * Cout + co
            b = tl.load(Wt + row[:, None] * Cin + ci[None, :], mask=cimask[None, :], other=0.0)
            acc = _dot_swappable(a, b, acc, PREC, SWAP)
            c0, td, th, tw = _next_step(c0, td, th, tw, Cout, nth, ntw, BK)
    else:
        for k0 in range(0, K, BK):
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
            dy_off = n[:, None] * syn + co[None, :] * syc + odd * syd + ohh * syh + oww * syw
            a = tl.load(DY + dy_off, mask=ok, other=0.0)
            if BN_BWD:
                yb = tl.load(YB + dy_off, mask=ok, other=0.0)
                a = _bn_bwd_prologue(a, yb, ok, co[None, :], kmask[None, :], AL, BE, GA).to(DY.dtype.element_ty)
            row = ((kd * KH + kh) * KW + kw) * Cout + co  # in the [taps, Cout, Cin] weight: rows of Cin
            b = tl.load(Wt + row[:, None] * Cin + ci[None, :], mask=kmask[:, None] & cimask[None, :], other=0.0)
            acc = _dot_swappable(a, b, acc, PREC, SWAP)
    if SWAP:
        acc = tl.trans(acc)
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
def _wgrad_dy_tile(DY, YB, AL, BE, GA, co, comask, n, od, oh, ow, pmask, syn, syc, syd, syh, syw, BN_BWD: tl.constexpr):
    """The wgrad's dY tile [channels co, positions]: dY, or formed from (dZ, Y) by the BatchNorm
    backward while loading (BN_BWD)."""
    dy_off = co[:, None] * syc + (n * syn + od * syd + oh * syh + ow * syw)[None, :]
    amask = comask[:, None] & pmask[None, :]
    a = tl.load(DY + dy_off, mask=amask, other=0.0)
    if BN_BWD:
        yb = tl.load(YB + dy_off, mask=amask, other=0.0)
        a = _bn_bwd_prologue(a, yb, amask, co[:, None], comask[:, None], AL, BE, GA).to(DY.dtype.element_ty)
    return a


@triton.jit
def _affine_relu(b, bmask, sc, sh):
    """relu(b * sc + sh) per channel (axis 1), zero where the load was masked (padding)."""
    return tl.where(bmask, tl.maximum(b.to(tl.float32) * sc[None, :] + sh[None, :], 0.0), 0.0).to(b.dtype)


@triton.jit
def _conv_wgrad(X, DY, YB, DW, AL, BE, GA, SC_IN, SH_IN, Nb, Cin, Di, Hi, Wi, Cout, Do, Ho, Wo,
                sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw, P_PER,
                SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PD, PH, PW,
                KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BN_BWD: tl.constexpr, PROLOGUE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, TAP: tl.constexpr = False):
    """Partial dW[co, (tap, ci)] over output positions [q P_PER, (q+1) P_PER) into slot q of an
    fp32 [Q, Cout, taps * Cin] buffer (summed afterwards: deterministic, no atomics). Fused, each
    optional: dY from (dZ, Y) by the BatchNorm backward (BN_BWD), and the forward's prologue on
    X (PROLOGUE: the previous BatchNorm + ReLU, recomputed rather than stored). TAP (Cin a
    multiple of BN): the program's columns lie in one tap, so the X tile's address and padding
    mask are a position vector plus a channel range, not a (position, column) grid."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    q = tl.program_id(2)
    P = Nb * Do * Ho * Wo
    KF = KD * KH * KW * Cin
    co = pid_m * BM + tl.arange(0, BM)
    comask = co < Cout
    f = pid_n * BN + tl.arange(0, BN)
    fmask = f < KF
    kd, kh, kw, ci = _split_k(f, Cin, KH, KW)
    if PROLOGUE:
        sc = tl.load(SC_IN + ci, mask=fmask, other=0.0)
        sh = tl.load(SH_IN + ci, mask=fmask, other=0.0)
    acc = tl.zeros((BM, BN), tl.float32)
    p_lo = q * P_PER
    p_hi = tl.minimum(p_lo + P_PER, P)
    if TAP:
        # one tap for all columns; the positions are decoded once and then advanced by BK with
        # carries, not re-divided each step
        t0 = (pid_n * BN) // Cin
        tkd, tkh, tkw = t0 // (KW * KH), (t0 // KW) % KH, t0 % KW
        n, od, oh, ow = _split_m(p_lo + tl.arange(0, BK), Do, Ho, Wo)
        step_w, step_h, step_d, step_n = BK % Wo, (BK // Wo) % Ho, (BK // (Wo * Ho)) % Do, BK // (Wo * Ho * Do)
        for p0 in range(p_lo, p_hi, BK):
            pmask = p0 + tl.arange(0, BK) < p_hi
            a = _wgrad_dy_tile(DY, YB, AL, BE, GA, co, comask, n, od, oh, ow, pmask, syn, syc, syd, syh, syw, BN_BWD)
            idd = od * SD - PD + tkd
            ihh = oh * SH - PH + tkh
            iww = ow * SW - PW + tkw
            rin = (pmask & (idd.to(tl.uint32, bitcast=True) < Di) & (ihh.to(tl.uint32, bitcast=True) < Hi)
                   & (iww.to(tl.uint32, bitcast=True) < Wi))
            bmask = rin[:, None]
            b = tl.load(X + (n * sxn + idd * sxd + ihh * sxh + iww * sxw)[:, None] + ci[None, :] * sxc, mask=bmask,
                        other=0.0)
            if PROLOGUE:  # zero padding stays zero, as in the forward
                b = _affine_relu(b, bmask, sc, sh)
            acc = tl.dot(a, b, acc, input_precision=PREC)
            ow += step_w
            carry = ow >= Wo
            ow = tl.where(carry, ow - Wo, ow)
            oh += step_h + carry.to(tl.int32)
            carry = oh >= Ho
            oh = tl.where(carry, oh - Ho, oh)
            od += step_d + carry.to(tl.int32)
            carry = od >= Do
            od = tl.where(carry, od - Do, od)
            n += step_n + carry.to(tl.int32)
    else:
        for p0 in range(p_lo, p_hi, BK):
            p = p0 + tl.arange(0, BK)
            pmask = (p < P) & (p < p_lo + P_PER)
            n, od, oh, ow = _split_m(p, Do, Ho, Wo)
            a = _wgrad_dy_tile(DY, YB, AL, BE, GA, co, comask, n, od, oh, ow, pmask, syn, syc, syd, syh, syw, BN_BWD)
            sp, inb = _in_tap(od, oh, ow, kd, kh, kw, Di, Hi, Wi, sxd, sxh, sxw, SD, SH, SW, PD, PH, PW)
            bmask = inb & pmask[:, None] & fmask[None, :]
            b = tl.load(X + n[:, None] * sxn + ci[None, :] * sxc + sp, mask=bmask, other=0.0)
            if PROLOGUE:  # zero padding stays zero, as in the forward
                b = _affine_relu(b, bmask, sc, sh)
            acc = tl.dot(a, b, acc, input_precision=PREC)
    tl.store(DW + q * Cout * KF + co[:, None] * KF + f[None, :], acc, mask=comask[:, None] & fmask[None, :])


@triton.jit
def _bn_act_fwd(Y, SC, SH, R, SCR, SHR, OUT, P, C, HAS_RES: tl.constexpr, RES_BN: tl.constexpr,
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
def _bn_act_bwd(DOUT, OUT, DZ, Y, MU, R, MUR, STATS, P, C, RES_BN: tl.constexpr, BP: tl.constexpr,
                BC: tl.constexpr):
    """Backward of _bn_act_fwd's ReLU, dZ = dOUT [OUT > 0], with the BatchNorm backward's two
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
