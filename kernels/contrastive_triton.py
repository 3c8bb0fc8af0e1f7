"""Triton kernels of the blockwise symmetric InfoNCE (see contrastive_ref.py for the math).

Forward, one pass over S: program (p, q) owns row blocks p, p+P, ... against the q-th range of
column blocks; per tile it keeps the online row max/sum in registers and merges the tile's
column max/sum into its own slot of a [P, b_c] partial buffer (no atomics, deterministic).
Memory is O((P + Q) * b), never b_r x b_c; the column split Q fills the chip at small b. One
finalize launch merges the partials and sums the loss.
Backward: `_bwd_rows` (one program per row block, output-d chunk and column split) recomputes
the S tiles, forms G in-tile from both directions and accumulates dI = s G T and sum(G S);
`_bwd_cols` does the same per column block for dT = s G^T I. With FULL tiles the d chunk is all
of d: each operand tile is loaded once and serves both the S dot and the gradient dot.
Masking handles any b and any d; a masked pair (group id INVALID, see contrastive_ref.py) is
masked like a row or column beyond b.

The launch configuration is one rule, `clip_tiles`, holding the tiles measured fastest on an
H100 (benchmarks/results/loss-sweep-gpu-20261122T180000.json); a caller may pass others
(`tiles=`, from the config's `kernels:` section). Untimed variants live in kernels/tuning/.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .contrastive_ref import INVALID as _INVALID, merge_column_stats
from .device import num_sms

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
INVALID = tl.constexpr(_INVALID)  # a jit function reads only constexpr globals


@triton.jit
def s_tile(I, T, rows, cols, rmask, cmask, s, D, sI, sT, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
           PREC: tl.constexpr):
    """s * I[rows] @ T[cols]^T in fp32, looping over d in BK chunks."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ks = tl.arange(0, BK)
    for k0 in range(0, D, BK):
        kk = k0 + ks
        kmask = kk < D
        a = tl.load(I + rows[:, None] * sI + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(T + cols[:, None] * sT + kk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc * s


@triton.jit
def col_partials(CMAX, CSUM, pid, B_C, cols, cmask, rb):
    """This program's column partials (max, sum) so far; a program's first row block (rb == pid)
    starts its slot empty, so the kernel needs no zeroed buffer."""
    seen = cmask & (rb != pid)
    return (tl.load(CMAX + pid * B_C + cols, mask=seen, other=-float("inf")),
            tl.load(CSUM + pid * B_C + cols, mask=seen, other=0.0))


@triton.jit
def col_sums_own_max(S, t_max):
    """sum_i exp(S - t_max) per column, each relative to its own tile max (0 for an empty column)."""
    return tl.sum(tl.exp(S - tl.where(t_max == -float("inf"), 0.0, t_max)[None, :]), 0)


@triton.jit
def merge_max_sum(p_max, p_sum, t_max, t_sum):
    """Two (max, sum of exp(x - max)) partials of the same columns -> one; empty ones are -inf."""
    n_max = tl.maximum(p_max, t_max)
    n_safe = tl.where(n_max == -float("inf"), 0.0, n_max)
    return n_max, p_sum * tl.exp(p_max - n_safe) + t_sum * tl.exp(t_max - n_safe)


@triton.jit
def _fwd(I, T, G_R, G_C, M_R, L_R, POS, CMAX, CSUM, scale_ptr, B_R, B_C, D, sI, sT, CB_PER,
         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Program (p, q) owns row blocks p, p + P, ... against column blocks [q CB_PER, (q+1) CB_PER).
    Row partials (max, sum, pos) go to slot q of [Q, b_r], column partials to slot p of [P, b_c]."""
    pid = tl.program_id(0)
    q = tl.program_id(1)
    s = tl.load(scale_ptr).to(tl.float32)
    cb_lo = q * CB_PER
    cb_hi = tl.minimum(cb_lo + CB_PER, tl.cdiv(B_C, BN))
    for rb in range(pid, tl.cdiv(B_R, BM), tl.num_programs(0)):
        rows = rb * BM + tl.arange(0, BM)
        rmask = rows < B_R
        g_r = tl.load(G_R + rows, mask=rmask, other=-1)
        r_ok = rmask & (g_r != INVALID)
        m_i = tl.full((BM,), -float("inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        pos = tl.zeros((BM,), tl.float32)
        for cb in range(cb_lo, cb_hi):
            cols = cb * BN + tl.arange(0, BN)
            cmask = cols < B_C
            g_c = tl.load(G_C + cols, mask=cmask, other=-2)
            S = s_tile(I, T, rows, cols, rmask, cmask, s, D, sI, sT, BM, BN, BK, PREC)
            valid = r_ok[:, None] & (cmask & (g_c != INVALID))[None, :]
            S = tl.where(valid, S, -float("inf"))
            # rows: online log-sum-exp
            m_new = tl.maximum(m_i, tl.max(S, 1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(S - m_safe[:, None]), 1)
            m_i = m_new
            # positives, computed in-tile from the group ids (never a b x b target matrix)
            pos += tl.sum(tl.where(valid & (g_r[:, None] == g_c[None, :]), S, 0.0), 1)
            # columns: this tile's (max, sum) merged into the program's own partial slot
            t_max = tl.max(S, 0)
            t_sum = col_sums_own_max(S, t_max)
            p_max, p_sum = col_partials(CMAX, CSUM, pid, B_C, cols, cmask, rb)
            n_max, p_sum = merge_max_sum(p_max, p_sum, t_max, t_sum)
            tl.store(CMAX + pid * B_C + cols, n_max, mask=cmask)
            tl.store(CSUM + pid * B_C + cols, p_sum, mask=cmask)
        tl.store(M_R + q * B_R + rows, m_i, mask=rmask)
        tl.store(L_R + q * B_R + rows, l_i, mask=rmask)
        tl.store(POS + q * B_R + rows, pos, mask=rmask)


@triton.jit
def g_tile(S, rows, cols, rmask, cmask, LSE_R, LSE_C, NPOS, G_R, G_C, TRANS: tl.constexpr = False):
    """dLoss/dS on one tile (sum reduction, before coef), both directions, from the stored row
    and column lse: (exp(S - lse_r) + exp(S - lse_c)) / 2 - target. Entries lie in [-1, 1]; coef
    (1/b for the mean) is applied after the dots, so that fp16 operands do not underflow. TRANS:
    S is given as S^T [cols, rows] and G^T comes out, in the layout of the dT dot's left operand,
    so no register tile is transposed."""
    lr = tl.load(LSE_R + rows, mask=rmask, other=0.0)
    lc = tl.load(LSE_C + cols, mask=cmask, other=0.0)
    npos = tl.load(NPOS + rows, mask=rmask, other=1.0)
    g_r = tl.load(G_R + rows, mask=rmask, other=-1)
    g_c = tl.load(G_C + cols, mask=cmask, other=-2)
    if TRANS:
        p = 0.5 * (tl.exp(S - lr[None, :]) + tl.exp(S - lc[:, None]))
        valid = (cmask & (g_c != INVALID))[:, None] & (rmask & (g_r != INVALID))[None, :]
        t = tl.where(g_c[:, None] == g_r[None, :], 1.0 / npos[None, :], 0.0)
    else:
        p = 0.5 * (tl.exp(S - lr[:, None]) + tl.exp(S - lc[None, :]))
        valid = (rmask & (g_r != INVALID))[:, None] & (cmask & (g_c != INVALID))[None, :]
        t = tl.where(g_r[:, None] == g_c[None, :], 1.0 / npos[:, None], 0.0)
    return tl.where(valid, p - t, 0.0)


@triton.jit
def _bwd_rows(I, T, G_R, G_C, LSE_R, LSE_C, NPOS, DI, GS, scale_ptr, coef_ptr, B_R, B_C, D, sI, sT, sDI, CB_PER,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, FULL: tl.constexpr,
              PREC: tl.constexpr, GSCALE: tl.constexpr):
    """Program (row block, d chunk, column split q): dI partial over its columns into slot q.
    FULL (BD >= D): the row tile of I is loaded once, and each T tile once for both dots."""
    rb = tl.program_id(0)
    dc = tl.program_id(1)
    q = tl.program_id(2)
    s = tl.load(scale_ptr).to(tl.float32)
    coef = tl.load(coef_ptr).to(tl.float32)
    rows = rb * BM + tl.arange(0, BM)
    rmask = rows < B_R
    dd = dc * BD + tl.arange(0, BD)
    dmask = dd < D
    if FULL:
        a = tl.load(I + rows[:, None] * sI + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    acc = tl.zeros((BM, BD), tl.float32)
    gs = tl.zeros((BM,), tl.float32)
    cb_lo = q * CB_PER
    for cb in range(cb_lo, tl.minimum(cb_lo + CB_PER, tl.cdiv(B_C, BN))):
        cols = cb * BN + tl.arange(0, BN)
        cmask = cols < B_C
        t = tl.load(T + cols[:, None] * sT + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        if FULL:
            S = tl.dot(a, tl.trans(t), input_precision=PREC) * s
        else:
            S = s_tile(I, T, rows, cols, rmask, cmask, s, D, sI, sT, BM, BN, BK, PREC)
        G = g_tile(S, rows, cols, rmask, cmask, LSE_R, LSE_C, NPOS, G_R, G_C)
        gs += tl.sum(G * S, 1)
        acc = tl.dot((G * GSCALE).to(t.dtype), t, acc, input_precision=PREC)
    out = DI + q * B_R * sDI + rows[:, None] * sDI + dd[None, :]
    tl.store(out, (acc * (s * coef / GSCALE)).to(DI.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    if dc == 0:
        tl.store(GS + q * B_R + rows, gs * (coef / s), mask=rmask)


@triton.jit
def _bwd_cols(I, T, G_R, G_C, LSE_R, LSE_C, NPOS, DT, scale_ptr, coef_ptr, B_R, B_C, D, sI, sT, sDT, RB_PER,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, FULL: tl.constexpr,
              PREC: tl.constexpr, GSCALE: tl.constexpr):
    """Program (column block, d chunk, row split q): dT partial over its rows into slot q."""
    cb = tl.program_id(0)
    dc = tl.program_id(1)
    q = tl.program_id(2)
    s = tl.load(scale_ptr).to(tl.float32)
    coef = tl.load(coef_ptr).to(tl.float32)
    cols = cb * BN + tl.arange(0, BN)
    cmask = cols < B_C
    dd = dc * BD + tl.arange(0, BD)
    dmask = dd < D
    if FULL:
        t = tl.load(T + cols[:, None] * sT + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
    acc = tl.zeros((BN, BD), tl.float32)
    rb_lo = q * RB_PER
    for rb in range(rb_lo, tl.minimum(rb_lo + RB_PER, tl.cdiv(B_R, BM))):
        rows = rb * BM + tl.arange(0, BM)
        rmask = rows < B_R
        a = tl.load(I + rows[:, None] * sI + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        if FULL:  # S^T = T I^T, computed as such
            St = tl.dot(t, tl.trans(a), input_precision=PREC) * s
        else:
            St = s_tile(T, I, cols, rows, cmask, rmask, s, D, sT, sI, BN, BM, BK, PREC)
        Gt = g_tile(St, rows, cols, rmask, cmask, LSE_R, LSE_C, NPOS, G_R, G_C, TRANS=True)
        acc = tl.dot((Gt * GSCALE).to(a.dtype), a, acc, input_precision=PREC)
    out = DT + q * B_C * sDT + cols[:, None] * sDT + dd[None, :]
    tl.store(out, (acc * (s * coef / GSCALE)).to(DT.dtype.element_ty), mask=cmask[:, None] & dmask[None, :])


@triton.jit
def _merge_stats(M, L, n, idx, mask, B):
    """Log-sum-exp of n stacked partials (max, sum of exp(x - max)) of length B, at idx."""
    m = tl.full(idx.shape, -float("inf"), tl.float32)
    for k in range(0, n):
        m = tl.maximum(m, tl.load(M + k * B + idx, mask=mask, other=0.0))
    acc = tl.zeros(idx.shape, tl.float32)
    for k in range(0, n):
        acc += tl.load(L + k * B + idx, mask=mask, other=1.0) * tl.exp(tl.load(M + k * B + idx, mask=mask, other=0.0) - m)
    return m + tl.log(acc)


@triton.jit
def _finalize(M_R, L_R, POS, CMAX, CSUM, NPOS, G, LSE_R, LSE_C, LOSS_PART, B, Q, P, BLOCK: tl.constexpr):
    """One launch instead of ~20 small torch ops (at small b their launch latency is the cost):
    merge the row partials over Q splits and the column partials over P programs, and sum this
    block's share of the loss, 0.5 (lse_r + lse_c) - pos / n_pos, over the valid pairs."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < B
    lse_r = _merge_stats(M_R, L_R, Q, idx, mask, B)
    lse_c = _merge_stats(CMAX, CSUM, P, idx, mask, B)
    pos = tl.zeros((BLOCK,), tl.float32)
    for k in range(0, Q):
        pos += tl.load(POS + k * B + idx, mask=mask, other=0.0)
    n = tl.load(NPOS + idx, mask=mask, other=1.0)
    tl.store(LSE_R + idx, lse_r, mask=mask)
    tl.store(LSE_C + idx, lse_c, mask=mask)
    ok = mask & (tl.load(G + idx, mask=mask, other=INVALID) != INVALID)
    tl.store(LOSS_PART + tl.program_id(0), tl.sum(tl.where(ok, 0.5 * (lse_r + lse_c) - pos / n, 0.0), 0))


# ---- launch configuration -------------------------------------------------------------------

class ClipTiles(NamedTuple):
    """One pass's tiles: rows BM x columns BN per S tile, BK the d step of an S dot, BD the
    output-d chunk of a backward pass (FULL: all of d, when whole rows fit FULL_ROW_BYTES)."""
    BM: int
    BN: int
    BK: int
    BD: int
    num_warps: int
    num_stages: int
    full: bool = False


FULL_ROW_BYTES = 1024  # FULL keeps whole [BM, pow2(d)] operand tiles in shared memory: bf16 d <= 512


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(1, n) - 1).bit_length())


def clip_tiles(d: int, dtype: torch.dtype, which: str = "fwd") -> ClipTiles:
    """The rule: the H100 sweep's fastest tiles (bf16, d = 512; 2026-11-22), per pass and
    operand width. The interpreter takes large tiles, since its cost is per block operation."""
    if which not in ("fwd", "bwd"):
        raise ValueError(f"which must be fwd or bwd, got {which!r}")
    if INTERPRET:
        return ClipTiles(64, 64, min(128, pow2(d)), 512, 4, 1)
    if dtype in (torch.float16, torch.bfloat16):
        return ClipTiles(64, 128, 64, 128, 4, 3) if which == "fwd" else ClipTiles(64, 64, 64, 512, 8, 2, full=True)
    return ClipTiles(64, 64, 32, 128, 8, 3)


def launch_tiles(t, d: int, itemsize: int) -> dict:
    """ClipTiles (or a tuple in its field order) -> the kernels' meta-parameters for this d:
    FULL only where a whole operand row fits, else d chunks of BD."""
    t = ClipTiles(*t)
    full = t.full and pow2(d) * itemsize <= FULL_ROW_BYTES
    return dict(BM=t.BM, BN=t.BN, BK=t.BK, BD=pow2(d) if full else min(t.BD, pow2(d)), FULL=full,
                num_warps=t.num_warps, num_stages=t.num_stages)


def prec(dtype: torch.dtype, tf32: bool) -> str:
    return "tf32" if (dtype == torch.float32 and tf32 and not INTERPRET) else "ieee"


def gscale(dtype: torch.dtype) -> float:
    """G is cast to the operand dtype for the gradient dots; its small entries (p ~ 1/b) are
    subnormal in fp16, so fp16 scales G by 2^12 (|G| <= 1 keeps it far from fp16's max)."""
    return 4096.0 if dtype == torch.float16 else 1.0


PART_BYTES = 1 << 30  # the forward's [P, b_c] column partials stay under this at any b
SPLIT_BYTES = 256 << 20  # fp32 gradient partials of a split backward stay under this


def split(n_blocks: int, want: int) -> tuple[int, int]:
    """Split n_blocks into at most `want` contiguous ranges: (blocks per range, ranges)."""
    per = triton.cdiv(n_blocks, max(1, min(want, n_blocks)))
    return per, triton.cdiv(n_blocks, per)


def fwd_grid(n_rb: int, n_cb: int, b_c: int, device) -> tuple[int, int, int]:
    """(P row programs, column blocks per split, Q splits). P is capped by the partials' memory;
    the column split fills the chip when there are few row blocks (small b). The interpreter
    uses P = 2 and 2 splits, so that the merges are exercised in CI."""
    if INTERPRET:
        return (min(n_rb, 2), *split(n_cb, 2))
    sms = num_sms(device)
    P = max(1, min(n_rb, 2 * sms, PART_BYTES // (8 * b_c)))
    return (P, *split(n_cb, triton.cdiv(4 * sms, P)))


def bwd_split(n_blocks: int, n_other: int, n_dc: int, b_out: int, D: int, device) -> tuple[int, int]:
    """Split the reduction loop of a backward pass when its grid alone would leave SMs idle."""
    if INTERPRET:
        return split(n_other, 2)
    want = min(triton.cdiv(4 * num_sms(device), n_blocks * n_dc), max(1, SPLIT_BYTES // (4 * b_out * D)))
    return split(n_other, want)


def _forward_partials(I, T, s, g_rows, g_cols, tf32, tiles):
    """The forward kernel: row partials (max, sum, pos) [Q, b_r], column partials [P, b_c]."""
    b_r, D = I.shape
    b_c = T.shape[0]
    t = launch_tiles(tiles or clip_tiles(D, I.dtype, "fwd"), D, I.element_size())
    n_rb, n_cb = triton.cdiv(b_r, t["BM"]), triton.cdiv(b_c, t["BN"])
    P, cb_per, Q = fwd_grid(n_rb, n_cb, b_c, I.device)
    f32 = dict(dtype=torch.float32, device=I.device)
    m_r, l_r, pos = (torch.empty((Q, b_r), **f32) for _ in range(3))
    cmax, csum = torch.empty((P, b_c), **f32), torch.empty((P, b_c), **f32)  # the kernel initialises them
    _fwd[(P, Q)](I, T, g_rows, g_cols, m_r, l_r, pos, cmax, csum, s, b_r, b_c, D, I.stride(0), T.stride(0), cb_per,
                 BM=t["BM"], BN=t["BN"], BK=t["BK"], PREC=prec(I.dtype, tf32), num_warps=t["num_warps"],
                 num_stages=t["num_stages"])
    return m_r, l_r, pos, cmax, csum


def triton_forward(I, T, s, g_rows, g_cols, tf32: bool = True, tiles: Optional[ClipTiles] = None):
    """Returns row lse [b_r], column partials (max, sum) [P, b_c] and positives' logits [b_r]."""
    m_r, l_r, pos, cmax, csum = _forward_partials(I, T, s, g_rows, g_cols, tf32, tiles)
    lse_r = m_r[0] + torch.log(l_r[0]) if m_r.shape[0] == 1 else merge_column_stats(m_r, l_r)
    return lse_r, cmax, csum, pos.sum(0)


def finalize(m_r, l_r, pos, cmax, csum, n_rows, groups):
    """Single process (b_r == b_c): one launch merges the forward's partials. Returns row lse,
    column lse and the summed loss (a 0-d fp32 tensor)."""
    b = m_r.shape[1]
    BLOCK = 1024
    nb = triton.cdiv(b, BLOCK)
    out = torch.empty(2 * b + nb, dtype=torch.float32, device=m_r.device)
    lse_r, lse_c, part = out[:b], out[b:2 * b], out[2 * b:]
    _finalize[(nb,)](m_r, l_r, pos, cmax, csum, n_rows, groups, lse_r, lse_c, part, b, m_r.shape[0], cmax.shape[0], BLOCK=BLOCK)
    return lse_r, lse_c, part.sum()


def triton_forward_loss(I, T, s, g_rows, g_cols, n_rows, tf32: bool = True, tiles: Optional[ClipTiles] = None):
    """Single process (b_r == b_c): the forward kernel, then the finalize launch."""
    return finalize(*_forward_partials(I, T, s, g_rows, g_cols, tf32, tiles), n_rows, g_rows)


def triton_backward(I, T, s, g_rows, g_cols, lse_r, lse_c, n_rows, coef, tf32: bool = True, grad_dtype=None,
                    tiles: Optional[ClipTiles] = None):
    """dI over row blocks and dT over column blocks, S recomputed once per direction, no atomics,
    deterministic. Gradients are stored in `grad_dtype` (default: the input dtype), accumulated
    in fp32; the distributed path asks for fp32 dT because it is summed across ranks afterwards.
    When a pass has too few blocks to fill the chip, its reduction loop is split and the fp32
    partials are summed (still deterministic)."""
    b_r, D = I.shape
    b_c = T.shape[0]
    t = launch_tiles(tiles or clip_tiles(D, I.dtype, "bwd"), D, I.element_size())
    coef_t = torch.as_tensor(coef, dtype=torch.float32, device=I.device).reshape(1)
    common = dict(t, PREC=prec(I.dtype, tf32), GSCALE=gscale(I.dtype))
    n_rb, n_cb, n_dc = triton.cdiv(b_r, t["BM"]), triton.cdiv(b_c, t["BN"]), triton.cdiv(D, t["BD"])
    f32 = dict(dtype=torch.float32, device=I.device)

    cb_per, Qc = bwd_split(n_rb, n_cb, n_dc, b_r, D, I.device)
    dI = torch.empty((Qc, b_r, D), **f32) if Qc > 1 else torch.empty((1, b_r, D), dtype=I.dtype, device=I.device)
    gs = torch.empty((Qc, b_r), **f32)
    _bwd_rows[(n_rb, n_dc, Qc)](I, T, g_rows, g_cols, lse_r, lse_c, n_rows, dI, gs, s, coef_t, b_r, b_c, D,
                                I.stride(0), T.stride(0), D, cb_per, **common)
    dI = dI.sum(0).to(I.dtype) if Qc > 1 else dI[0]

    rb_per, Qr = bwd_split(n_cb, n_rb, n_dc, b_c, D, I.device)
    dT = torch.empty((Qr, b_c, D), **f32) if Qr > 1 else torch.empty((1, b_c, D), dtype=grad_dtype or I.dtype,
                                                                     device=I.device)
    _bwd_cols[(n_cb, n_dc, Qr)](I, T, g_rows, g_cols, lse_r, lse_c, n_rows, dT, s, coef_t, b_r, b_c, D,
                                I.stride(0), T.stride(0), D, rb_per, **common)
    dT = dT.sum(0).to(grad_dtype or I.dtype) if Qr > 1 else dT[0]
    return dI, dT, gs.sum()
