"""Untimed variants of the convolution kernels, for the GPU benchmark to time (bench_conv.py,
benchmarks/conv_gpu.py) and their tests (test_conv3d_variants.py). Production (kernels/conv3d*.py)
runs none of them until a GPU run has measured one faster and its CUDA tests passed on the chip.

- the tap K loop (k_loop="tap"): for reduced channels a multiple of BK, each K step lies within
  one tap, whose coordinates are scalars advanced by counters (no division), with each row's
  padding test as one bit per tap and axis, computed before the loop; the wgrad's tap form (Cin
  a multiple of its N tile) advances the positions with carries. 30-55% of the flat loop's
  instructions per K step in the forward and dgrad machine code, same MMAs.
- swapped operands (tiles ending in "swap"): Y^T = W X^T, the output channels as the MMA's M
  side, for narrow layers (64 channels), where the unswapped tile re-reads the weight tile per
  64 rows from shared memory.
- the forward's activation copies through L1 (act_l1, with the tap loop; l1_copies.py).

A ConvVariant gives the production launchers its tile rule (`variant.rule`) and, while
`variant.active()`, sends their GEMM launches to these kernels, which take the same arguments
plus the variant's flags. So the production block, stem and tower run unchanged under a variant:

    v = ConvVariant(k_loop="tap", swap=True)
    tower = ResNet3d18(..., conv_impl="triton", conv_tiles=v.rule)
    with v.active():
        tower(x)
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Union

import triton
import triton.language as tl

from kernels import conv3d_triton as ct
from kernels.conv3d import conv_tiles
from kernels.conv3d_triton import (dgrad_classes, dgrad_epilogue, dgrad_step_tiles, fwd_epilogue, fwd_step_tiles, split_k,
                                   split_m, wgrad_step_tiles)

# Tile shapes (BM, BN, BK, num_warps, num_stages) the GPU sweep times, kernel by kernel and layer
# by layer; conv_tiles' GPU defaults were chosen from its record (conv-gpu-20261123T052022.json).
TILE_GRID = [(128, 64, 32, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4),
             (128, 128, 32, 4, 4), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 256, 32, 8, 3)]
# Swapped tiles (output channels on the MMA's M side), forward and dgrad: for 64 output channels
# they lift compile_report's shared-memory cap from 0.57 (128 x 64, m64n64 MMAs) to 0.67-0.73
# (m64n128), 0.8 with one warpgroup over 256 voxels (m64n256); the 512-voxel tile (cap 0.84)
# reads layer1's weight through L2 a quarter as often as the 128-voxel default.
SWAP_TILES = [(128, 64, 64, 4, 3, "swap"), (256, 64, 64, 8, 3, "swap"), (256, 64, 64, 8, 2, "swap"),
              (256, 128, 64, 8, 3, "swap"), (256, 64, 32, 4, 4, "swap"), (512, 64, 32, 8, 3, "swap")]
# swap=True's tiles by kind for launches with at most 64 output channels: the forward's one
# warpgroup (m64n256, 230 registers, two CTAs per SM); the dgrad keeps 8 warps (with 4 its
# ReLU/BN epilogue spills).
SWAP_NARROW_TILES = {"fwd": (256, 64, 32, 4, 4, "swap"), "dgrad": (256, 64, 64, 8, 3, "swap")}
KEYS = ("BM", "BN", "BK", "num_warps", "num_stages")


def is_swapped(tile: tuple) -> bool:
    return len(tile) > 5


def tile_dict(tile: tuple) -> dict:
    """(BM, BN, BK, warps, stages[, "swap"]) -> launch keywords."""
    return dict(zip(KEYS, tile), **({"SWAP": True} if is_swapped(tile) else {}))


def tile_name(tile) -> str:
    return "x".join(map(str, tile[:3])) + f" w{tile[3]} s{tile[4]}" + (" swap" if is_swapped(tile) else "")


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
def conv_fwd_variant(X, Wt, Y, BIAS, RES, STATS,
                Nb, Cin, Di, Hi, Wi, Cout, Do, Ho, Wo,
                sxn, sxc, sxd, sxh, sxw,
                syn, syc, syd, syh, syw, srn, src, srd, srh, srw,
                SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PD, PH, PW,
                KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, STATS_ON: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                TAP: tl.constexpr = False, SWAP: tl.constexpr = False, ACT_CACHE: tl.constexpr = ""):
    """Production's conv_fwd_kernel (same arguments) with the tap K loop (TAP: Cin a multiple of BK),
    swapped operands (SWAP) and the activation copies marked for L1 (ACT_CACHE ".ca")."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    M = Nb * Do * Ho * Wo
    K = KD * KH * KW * Cin
    m = pid_m * BM + tl.arange(0, BM)
    mmask = m < M
    n, od, oh, ow = split_m(m, Do, Ho, Wo)
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
        dbits, hbits, wbits = _row_tap_bits(d0, h0, w0, Di, Hi, Wi, mmask, KD, KH, KW, 1)
        c0 = pid_m * 0
        kd = c0
        kh = c0
        kw = c0
        for k0 in range(0, K, BK):
            rin = ((dbits >> kd) & (hbits >> kh) & (wbits >> kw) & 1) != 0
            ci = c0 + tl.arange(0, BK)
            a = tl.load(row0[:, None] + ((kd * sxd + kh * sxh + kw * sxw) + ci * sxc)[None, :], mask=rin[:, None],
                        other=0.0, cache_modifier=ACT_CACHE)
            b = tl.load(Wt + co[None, :] * K + (k0 + tl.arange(0, BK))[:, None], mask=comask[None, :], other=0.0)
            acc = _dot_swappable(a, b, acc, PREC, SWAP)
            c0, kd, kh, kw = _next_step(c0, kd, kh, kw, Cin, KH, KW, BK)
    else:
        for k0 in range(0, K, BK):
            a, b = fwd_step_tiles(X, Wt, k0, K, Cin, n, od, oh, ow, mmask, co, comask, Di, Hi, Wi, sxn, sxc, sxd, sxh,
                                  sxw, SD, SH, SW, PD, PH, PW, KH, KW, BK)
            acc = _dot_swappable(a, b, acc, PREC, SWAP)
    if SWAP:
        acc = tl.trans(acc)
    fwd_epilogue(acc, Y, BIAS, RES, STATS, pid_m, M, Cout, co, comask, mmask, n, od, oh, ow,
                 syn, syc, syd, syh, syw, srn, src, srd, srh, srw, HAS_BIAS, HAS_RES, RELU, STATS_ON, BM)


@triton.jit
def conv_dgrad_variant(DY, Wt, DX, RES, YIN, SC_IN, SH_IN, MU_IN, STATS,
                  Nb, Cin, Di, Hi, Wi, Cout, Do, Ho, Wo,
                  syn, syc, syd, syh, syw, sxn, sxc, sxd, sxh, sxw,
                  SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PD, PH, PW,
                  KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                  HAS_RES: tl.constexpr, RELU_BN: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                  TAP: tl.constexpr = False, SWAP: tl.constexpr = False):
    """Production's conv_dgrad_kernel (same arguments) with the tap K loop (TAP: Cout a multiple of BK:
    the class's tap advances by counters, each K step's dY rows a hoisted base plus a scalar
    offset) and swapped operands (SWAP: dX^T = W^T dY^T)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    (kd0, kh0, kw0, ntd, nth, ntw, cd, ch, cw, n, jd, jh, jw, i_d, i_h, i_w, mmask,
     K) = dgrad_classes(pid_m, Nb, Di, Hi, Wi, Cout, SD, SH, SW, PD, PH, PW, KD, KH, KW, BM)
    ci = pid_n * BN + tl.arange(0, BN)
    cimask = ci < Cin
    if SWAP:
        acc = tl.zeros((BN, BM), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    if TAP:
        o_d, o_h, o_w = jd + cd, jh + ch, jw + cw
        base = n * syn + o_d * syd + o_h * syh + o_w * syw
        dbits, hbits, wbits = _row_tap_bits(o_d, o_h, o_w, Do, Ho, Wo, mmask, KD, KH, KW, -1)
        c0 = pid_m * 0
        td = c0
        th = c0
        tw = c0
        for k0 in range(0, K, BK):
            co = c0 + tl.arange(0, BK)
            ok = (((dbits >> td) & (hbits >> th) & (wbits >> tw) & 1) != 0)[:, None]
            a = tl.load(DY + base[:, None] + (co * syc - (td * syd + th * syh + tw * syw))[None, :], mask=ok, other=0.0)
            row = (((kd0 + SD * td) * KH + kh0 + SH * th) * KW + kw0 + SW * tw) * Cout + co
            b = tl.load(Wt + row[:, None] * Cin + ci[None, :], mask=cimask[None, :], other=0.0)
            acc = _dot_swappable(a, b, acc, PREC, SWAP)
            c0, td, th, tw = _next_step(c0, td, th, tw, Cout, nth, ntw, BK)
    else:
        for k0 in range(0, K, BK):
            a, b = dgrad_step_tiles(DY, Wt, k0, K, Cin, Cout, Do, Ho, Wo, n, jd, jh, jw, mmask, ci, cimask, kd0, kh0,
                                    kw0, nth, ntw, cd, ch, cw, syn, syc, syd, syh, syw, SD, SH, SW, KH, KW, BK)
            acc = _dot_swappable(a, b, acc, PREC, SWAP)
    if SWAP:
        acc = tl.trans(acc)
    dgrad_epilogue(acc, DX, RES, YIN, SC_IN, SH_IN, MU_IN, STATS, Cin, ci, cimask, mmask, n, i_d, i_h, i_w,
                   sxn, sxc, sxd, sxh, sxw, HAS_RES, RELU_BN)


@triton.jit
def conv_wgrad_variant(X, DY, DW, Nb, Cin, Di, Hi, Wi, Cout, Do, Ho, Wo,
                  sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw, P_PER,
                  SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PD, PH, PW,
                  KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, TAP: tl.constexpr = False):
    """Production's conv_wgrad_kernel (same arguments) with the tap form (TAP: Cin a multiple of BN, so
    the program's columns lie in one tap; positions decoded once, then advanced with carries)."""
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
    p_hi = tl.minimum(p_lo + P_PER, P)
    if TAP:
        t0 = (pid_n * BN) // Cin
        tkd, tkh, tkw = t0 // (KW * KH), (t0 // KW) % KH, t0 % KW
        n, od, oh, ow = split_m(p_lo + tl.arange(0, BK), Do, Ho, Wo)
        step_w, step_h, step_d, step_n = BK % Wo, (BK // Wo) % Ho, (BK // (Wo * Ho)) % Do, BK // (Wo * Ho * Do)
        for p0 in range(p_lo, p_hi, BK):
            pmask = p0 + tl.arange(0, BK) < p_hi
            a = tl.load(DY + co[:, None] * syc + (n * syn + od * syd + oh * syh + ow * syw)[None, :],
                        mask=comask[:, None] & pmask[None, :], other=0.0)
            idd = od * SD - PD + tkd
            ihh = oh * SH - PH + tkh
            iww = ow * SW - PW + tkw
            rin = (pmask & (idd.to(tl.uint32, bitcast=True) < Di) & (ihh.to(tl.uint32, bitcast=True) < Hi)
                   & (iww.to(tl.uint32, bitcast=True) < Wi))
            b = tl.load(X + (n * sxn + idd * sxd + ihh * sxh + iww * sxw)[:, None] + ci[None, :] * sxc,
                        mask=rin[:, None], other=0.0)
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
            a, b = wgrad_step_tiles(X, DY, p0, p_lo, P_PER, P, co, comask, kd, kh, kw, ci, fmask, Do, Ho, Wo, Di, Hi,
                                    Wi, sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw, SD, SH, SW, PD, PH, PW, BK)
            acc = tl.dot(a, b, acc, input_precision=PREC)
    tl.store(DW + q * Cout * KF + co[:, None] * KF + f[None, :], acc, mask=comask[:, None] & fmask[None, :])


# production kernel name -> (variant kernel, the argument holding the channels a tap reduces,
# the tile side that walks them)
VARIANTS = {"conv_fwd_kernel": (conv_fwd_variant, "Cin", "BK"), "conv_dgrad_kernel": (conv_dgrad_variant, "Cout", "BK"),
            "conv_wgrad_kernel": (conv_wgrad_variant, "Cin", "BN")}


@dataclass(frozen=True)
class ConvVariant:
    """k_loop: "flat" (production's) or "tap"; swap: False, True (launches with at most 64 output
    channels take SWAP_NARROW_TILES) or a swapped forward tile for them; act_l1: the tap forward's
    activation copies through L1; tiles: a fixed tile per kind ({"fwd": (...), ...}), for sweeps."""
    k_loop: str = "flat"
    swap: Union[bool, tuple] = False
    act_l1: bool = False
    tiles: Optional[dict] = None

    def __post_init__(self):
        if self.k_loop not in ("flat", "tap"):
            raise ValueError(f"k_loop must be flat or tap, got {self.k_loop!r}")
        if isinstance(self.swap, tuple) and not is_swapped(self.swap):
            raise ValueError(f"swap: a forward tile must be swapped (BM, BN, BK, warps, stages, 'swap'), got {self.swap}")
        for kind, tile in (self.tiles or {}).items():
            if kind not in VARIANT_KINDS or (is_swapped(tile) and kind == "wgrad"):
                raise ValueError(f"tiles: {kind!r} must be fwd, dgrad or wgrad, and only fwd/dgrad swap; got {tile}")

    def rule(self, kind: str, M: int, N: int, K: int, chan: int = 0) -> dict:
        """The tile of one GEMM launch (a conv3d tile rule), SWAP marked where the variant swaps."""
        if self.tiles and kind in self.tiles:
            return tile_dict(self.tiles[kind])
        t = conv_tiles(kind, M, N, K, chan)
        if self.swap and kind != "wgrad" and N <= 64 and not ct.INTERPRET:
            tile = self.swap if isinstance(self.swap, tuple) and kind == "fwd" else SWAP_NARROW_TILES[kind]
            small_bk = 32 if K >= 32 else 16
            t = tile_dict(tile)
            t["BK"] = t["BK"] if chan >= t["BK"] else small_bk
        elif self.swap and kind != "wgrad" and N <= 64:  # the interpreter keeps its large tiles
            t["SWAP"] = True
        return t

    def flags(self, name: str, args: dict, meta: dict) -> dict:
        """The variant kernel's extra flags for one captured launch of production kernel `name`."""
        _, chan, side = VARIANTS[name]
        tap = self.k_loop == "tap" and args[chan] % meta[side] == 0 and max(args["KD"], args["KH"], args["KW"]) <= 31
        out = {"TAP": tap}
        if name == "conv_fwd_kernel" and tap and self.act_l1:
            out["ACT_CACHE"] = ".ca"
        return out

    @contextmanager
    def active(self):
        """While inside, production's GEMM launches run this variant's kernels (a process-wide
        swap of kernels.conv3d_triton's names; tuning only)."""
        if self.act_l1:
            from .l1_copies import install

            install()  # before the marked kernel can compile
        saved = {name: getattr(ct, name) for name in VARIANTS}
        for name, kernel in saved.items():
            setattr(ct, name, _Redirect(name, kernel, self))
        try:
            yield self
        finally:
            for name, kernel in saved.items():
                setattr(ct, name, kernel)


VARIANT_KINDS = ("fwd", "dgrad", "wgrad")


class _Redirect:
    """Stands in for a production kernel: `kernel[grid](*args, **meta)` launches the variant
    kernel with the same arguments and the variant's flags."""

    def __init__(self, name, production, variant: ConvVariant):
        self.name, self.production, self.variant = name, production, variant
        self.__name__ = name

    def __getitem__(self, grid):
        kernel = VARIANTS[self.name][0]

        def launch(*args, **meta):
            named = dict(zip(self.production.arg_names, args))
            return kernel[grid](*args, **meta, **self.variant.flags(self.name, named, meta))
        return launch
