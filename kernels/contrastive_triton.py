"""Triton kernels of the blockwise symmetric InfoNCE (see contrastive_ref.py for the math).

Forward, one pass over S: program (p, q) owns row blocks p, p+P, ... against the q-th range of
column blocks; per tile it keeps the online row max/sum in registers and merges the tile's
column max/sum into its own slot of a [P, b_c] partial buffer (no atomics, deterministic). With
a program per row block (P = all of them, while the partials fit) the loop nest is two deep and
Triton flattens it, so operand loads run ahead across tiles.
Memory is O((P + Q) * b), never b_r x b_c; the column split Q fills the chip at small b.
Backward: `_bwd_rows` (one program per row block, output-d chunk and column split) recomputes
the S tiles, forms G in-tile from both directions and accumulates dI = s G T and sum(G S);
`_bwd_cols` does the same per column block for dT = s G^T I. With FULL tiles the d chunk is all
of d: each operand tile is loaded once and serves both the S dot and the gradient dot.
Masking handles any b and any d.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._device import num_sms
from .contrastive_ref import merge_column_stats

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _s_tile(I, T, rows, cols, rmask, cmask, s, D, sI, sT, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            PREC: tl.constexpr, r0=0, c0=0, TMA: tl.constexpr = False, I_L1: tl.constexpr = False):
    """s * I[rows] @ T[cols]^T in fp32, looping over d in BK chunks. TMA: I and T are tensor
    descriptors (_descriptors) and the tile is rows [r0, r0 + BM) x cols [c0, c0 + BN): the copy
    engine loads each operand block with no per-thread address arithmetic and fills rows past
    the end with zeros; rows the caller masks (a panel's rows past R) are loaded and masked later.
    I_L1 marks the I loads ".ca" for L1 (l1_copies.py): a forward program reloads the same row
    block for every column tile. (A flag, not the modifier string: Triton 3.6 cannot compile a
    helper whose string constexpr is left at its default.)"""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if TMA:
        for k0 in range(0, D, BK):
            acc = tl.dot(I.load([r0, k0]), tl.trans(T.load([c0, k0])), acc, input_precision=PREC)
    else:
        ks = tl.arange(0, BK)
        for k0 in range(0, D, BK):
            kk = k0 + ks
            kmask = kk < D
            a = tl.load(I + rows[:, None] * sI + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0,
                        cache_modifier=".ca" if I_L1 else "")
            b = tl.load(T + cols[:, None] * sT + kk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc * s


@triton.jit
def _descriptors(I, T, B_R, B_C, D, sI, sT, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Tensor descriptors of I and T in [BM, BK] and [BN, BK] blocks, for _s_tile's TMA loads."""
    return (tl.make_tensor_descriptor(I, [B_R, D], [sI, 1], [BM, BK]),
            tl.make_tensor_descriptor(T, [B_C, D], [sT, 1], [BN, BK]))


@triton.jit
def _col_partials(CMAX, CSUM, pid, B_C, cols, cmask, rb):
    """This program's column partials (max, sum) so far; a program's first row block (rb == pid)
    starts its slot empty, so the kernel needs no zeroed buffer."""
    seen = cmask & (rb != pid)
    return (tl.load(CMAX + pid * B_C + cols, mask=seen, other=-float("inf")),
            tl.load(CSUM + pid * B_C + cols, mask=seen, other=0.0))


@triton.jit
def _col_sums_own_max(S, t_max):
    """sum_i exp(S - t_max) per column, each relative to its own tile max (0 for an empty column)."""
    return tl.sum(tl.exp(S - tl.where(t_max == -float("inf"), 0.0, t_max)[None, :]), 0)


@triton.jit
def _fwd_rows(I, T, G_R, G_C, M_R, L_R, POS, CMAX, CSUM, s, B_R, B_C, D, sI, sT, rb, pid, q, cb_lo, cb_hi,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, FACTOR: tl.constexpr,
              SPAN: tl.constexpr, ONE_RB: tl.constexpr, TMA: tl.constexpr, I_L1: tl.constexpr):
    """Row block rb against column blocks [cb_lo, cb_hi): row partials (max, sum, pos) to slot q,
    each tile's column partials merged into slot pid. ONE_RB (rb == pid, the program's only row
    block): the slot starts empty, so nothing is read back, and the column loop with its K loop
    is a two-level nest that Triton flattens into one pipelined loop, so the next tile's operand
    loads are in flight during this tile's softmax epilogue."""
    rows = rb * BM + tl.arange(0, BM)
    rmask = rows < B_R
    g_r = tl.load(G_R + rows, mask=rmask, other=-1)
    m_i = tl.full((BM,), -float("inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    pos = tl.zeros((BM,), tl.float32)
    for cb in tl.range(cb_lo, cb_hi, flatten=ONE_RB):
        cols = cb * BN + tl.arange(0, BN)
        cmask = cols < B_C
        if FACTOR or ONE_RB:  # issued before the S loop, which hides their latency
            g_c = tl.load(G_C + cols, mask=cmask, other=-2)
        if FACTOR and not ONE_RB:
            p_max, p_sum = _col_partials(CMAX, CSUM, pid, B_C, cols, cmask, rb)
        S = _s_tile(I, T, rows, cols, rmask, cmask, s, D, sI, sT, BM, BN, BK, PREC, rb * BM, cb * BN, TMA, I_L1)
        valid = rmask[:, None] & cmask[None, :]
        S = tl.where(valid, S, -float("inf"))
        # rows: online log-sum-exp
        m_new = tl.maximum(m_i, tl.max(S, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        e = tl.exp(S - m_safe[:, None])
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(e, 1)
        m_i = m_new
        if not (FACTOR or ONE_RB):
            g_c = tl.load(G_C + cols, mask=cmask, other=-2)
        # positives, computed in-tile from the group ids (never a b x b target matrix)
        pos += tl.sum(tl.where(valid & (g_r[:, None] == g_c[None, :]), S, 0.0), 1)
        # columns: this tile's (reference, sum of exp(S - reference)) per column
        t_max = tl.max(S, 0)
        if FACTOR:
            ref = tl.max(tl.where(rmask, m_safe, -float("inf")), 0)
            if ref - tl.min(tl.where(cmask, t_max, float("inf")), 0) <= SPAN:
                t_sum = tl.sum(e * tl.where(rmask, tl.exp(m_safe - ref), 0.0)[:, None], 0)
                t_ref = tl.where(cmask, ref, -float("inf"))
            else:
                t_sum, t_ref = _col_sums_own_max(S, t_max), t_max
        else:
            t_sum, t_ref = _col_sums_own_max(S, t_max), t_max
            if not ONE_RB:
                p_max, p_sum = _col_partials(CMAX, CSUM, pid, B_C, cols, cmask, rb)
        if ONE_RB:  # the slot's first and only tile for these columns
            n_max, p_sum = t_ref, t_sum
        else:  # merge into the program's own partial slot
            n_max = tl.maximum(p_max, t_ref)
            n_safe = tl.where(n_max == -float("inf"), 0.0, n_max)
            p_sum = p_sum * tl.exp(p_max - n_safe) + t_sum * tl.exp(t_ref - n_safe)
        tl.store(CMAX + pid * B_C + cols, n_max, mask=cmask)
        tl.store(CSUM + pid * B_C + cols, p_sum, mask=cmask)
    tl.store(M_R + q * B_R + rows, m_i, mask=rmask)
    tl.store(L_R + q * B_R + rows, l_i, mask=rmask)
    tl.store(POS + q * B_R + rows, pos, mask=rmask)


@triton.jit
def _fwd(I, T, G_R, G_C, M_R, L_R, POS, CMAX, CSUM, scale_ptr, B_R, B_C, D, sI, sT, CB_PER,
         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, FACTOR: tl.constexpr = False,
         SPAN: tl.constexpr = 50.0, ONE_RB: tl.constexpr = False, TMA: tl.constexpr = False,
         I_L1: tl.constexpr = False):
    """Program (p, q) owns row blocks p, p + P, ... (only p when ONE_RB) against column blocks
    [q CB_PER, (q+1) CB_PER). Row partials (max, sum, pos) go to slot q of [Q, b_r], column
    partials to slot p of [P, b_c].
    FACTOR: the column sums reuse the rows' exponentials, sum_i exp(S - ref) = sum_i exp(S - m_i)
    exp(m_i - ref) with ref the tile's largest row max, when every column's tile max lies within
    SPAN of ref (so no column sum underflows); else, or without FACTOR, one more exponential per
    element relative to each column's own tile max. The merge takes either reference.
    TMA: the operands are loaded through tensor descriptors (_s_tile). I_L1: _s_tile's."""
    pid = tl.program_id(0)
    q = tl.program_id(1)
    s = tl.load(scale_ptr).to(tl.float32)
    cb_lo = q * CB_PER
    cb_hi = tl.minimum(cb_lo + CB_PER, tl.cdiv(B_C, BN))
    if TMA:
        I, T = _descriptors(I, T, B_R, B_C, D, sI, sT, BM, BN, BK)
    if ONE_RB:
        _fwd_rows(I, T, G_R, G_C, M_R, L_R, POS, CMAX, CSUM, s, B_R, B_C, D, sI, sT, pid, pid, q, cb_lo, cb_hi,
                  BM, BN, BK, PREC, FACTOR, SPAN, True, TMA, I_L1)
    else:
        for rb in range(pid, tl.cdiv(B_R, BM), tl.num_programs(0)):
            _fwd_rows(I, T, G_R, G_C, M_R, L_R, POS, CMAX, CSUM, s, B_R, B_C, D, sI, sT, rb, pid, q, cb_lo, cb_hi,
                      BM, BN, BK, PREC, FACTOR, SPAN, False, TMA, I_L1)


@triton.jit
def _two_exp(S, lr, lc, TRANS: tl.constexpr):
    if TRANS:
        return 0.5 * (tl.exp(S - lr[None, :]) + tl.exp(S - lc[:, None]))
    return 0.5 * (tl.exp(S - lr[:, None]) + tl.exp(S - lc[None, :]))


@triton.jit
def _half_softmax_sum(S, lr, lc, rmask, cmask, TRANS: tl.constexpr, FACTOR: tl.constexpr, SPAN: tl.constexpr = 50.0):
    """(exp(S - lr) + exp(S - lc)) / 2, the two directions' softmax. FACTOR: one exponential per
    element where the tile's lse values lie within SPAN of each other: exp(S - lc) = exp(S - lr)
    exp(lr - hi) exp(hi - lc), one factor per row and one per column (hi: the tile's largest lse).
    The exponentials run on the SFU at 1/256 of the tensor cores' FLOP rate, so at d = 512 two per
    element cost half as much as the S dot itself. Within SPAN no factor over- or underflows
    and a p lost to underflow in the product is below e^(SPAN - 87); a tile with an outlier row
    or column takes the two exponentials as the formula reads."""
    if FACTOR:
        hi = tl.maximum(tl.max(tl.where(rmask, lr, -float("inf")), 0), tl.max(tl.where(cmask, lc, -float("inf")), 0))
        lo = tl.minimum(tl.min(tl.where(rmask, lr, float("inf")), 0), tl.min(tl.where(cmask, lc, float("inf")), 0))
        if hi - lo <= SPAN:
            u = 0.5 * tl.exp(lr - hi)
            v = tl.exp(hi - lc)
            if TRANS:
                p = tl.exp(S - lr[None, :]) * (0.5 + u[None, :] * v[:, None])
            else:
                p = tl.exp(S - lr[:, None]) * (0.5 + u[:, None] * v[None, :])
        else:
            p = _two_exp(S, lr, lc, TRANS)
    else:
        p = _two_exp(S, lr, lc, TRANS)
    return p


@triton.jit
def _g_tile(S, rows, cols, rmask, cmask, LSE_R, LSE_C, NPOS, G_R, G_C, TRANS: tl.constexpr = False,
            FACTOR: tl.constexpr = False):
    """dLoss/dS on one tile (sum reduction, before coef), both directions, from the stored row
    and column lse. Entries lie in [-1, 1]; coef (1/b for the mean) is applied after the dots,
    so that fp16 operands do not underflow. TRANS: S is given as S^T [cols, rows] and G^T comes
    out, in the layout of the dT dot's left operand, so no register tile is transposed (on sm_90
    that cost a shared-memory round trip and spilled 544 bytes per thread in the column pass).
    FACTOR: one exponential per element where the tile allows (_half_softmax_sum); the two-pass
    kernels keep two, since the second branch pushes their d-wide accumulators into spills."""
    lr = tl.load(LSE_R + rows, mask=rmask, other=0.0)
    lc = tl.load(LSE_C + cols, mask=cmask, other=0.0)
    npos = tl.load(NPOS + rows, mask=rmask, other=1.0)
    g_r = tl.load(G_R + rows, mask=rmask, other=-1)
    g_c = tl.load(G_C + cols, mask=cmask, other=-2)
    p = _half_softmax_sum(S, lr, lc, rmask, cmask, TRANS, FACTOR)
    if TRANS:
        valid = cmask[:, None] & rmask[None, :]
        t = tl.where(g_c[:, None] == g_r[None, :], 1.0 / npos[None, :], 0.0)
    else:
        valid = rmask[:, None] & cmask[None, :]
        t = tl.where(g_r[:, None] == g_c[None, :], 1.0 / npos[:, None], 0.0)
    return tl.where(valid, p - t, 0.0)


@triton.jit
def _bwd_rows(I, T, G_R, G_C, LSE_R, LSE_C, NPOS, DI, GS, scale_ptr, coef_ptr, B_R, B_C, D, sI, sT, sDI, CB_PER,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, FULL: tl.constexpr,
              PREC: tl.constexpr, GSCALE: tl.constexpr, TMA: tl.constexpr = False):
    """Program (row block, d chunk, column split q): dI partial over its columns into slot q.
    FULL (BD >= D): the row tile of I is loaded once, and each T tile once for both dots.
    TMA (with FULL): those tiles come through tensor descriptors."""
    rb = tl.program_id(0)
    dc = tl.program_id(1)
    q = tl.program_id(2)
    s = tl.load(scale_ptr).to(tl.float32)
    coef = tl.load(coef_ptr).to(tl.float32)
    rows = rb * BM + tl.arange(0, BM)
    rmask = rows < B_R
    dd = dc * BD + tl.arange(0, BD)
    dmask = dd < D
    if TMA:
        I, T = _descriptors(I, T, B_R, B_C, D, sI, sT, BM, BN, BD)
        a = I.load([rb * BM, 0])
    elif FULL:
        a = tl.load(I + rows[:, None] * sI + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    acc = tl.zeros((BM, BD), tl.float32)
    gs = tl.zeros((BM,), tl.float32)
    cb_lo = q * CB_PER
    for cb in range(cb_lo, tl.minimum(cb_lo + CB_PER, tl.cdiv(B_C, BN))):
        cols = cb * BN + tl.arange(0, BN)
        cmask = cols < B_C
        if TMA:
            t = T.load([cb * BN, 0])
        else:
            t = tl.load(T + cols[:, None] * sT + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        if FULL:
            S = tl.dot(a, tl.trans(t), input_precision=PREC) * s
        else:
            S = _s_tile(I, T, rows, cols, rmask, cmask, s, D, sI, sT, BM, BN, BK, PREC)
        G = _g_tile(S, rows, cols, rmask, cmask, LSE_R, LSE_C, NPOS, G_R, G_C)
        gs += tl.sum(G * S, 1)
        acc = tl.dot((G * GSCALE).to(t.dtype), t, acc, input_precision=PREC)
    out = DI + q * B_R * sDI + rows[:, None] * sDI + dd[None, :]
    tl.store(out, (acc * (s * coef / GSCALE)).to(DI.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    if dc == 0:
        tl.store(GS + q * B_R + rows, gs * (coef / s), mask=rmask)


@triton.jit
def _bwd_cols(I, T, G_R, G_C, LSE_R, LSE_C, NPOS, DT, scale_ptr, coef_ptr, B_R, B_C, D, sI, sT, sDT, RB_PER,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, FULL: tl.constexpr,
              PREC: tl.constexpr, GSCALE: tl.constexpr, TMA: tl.constexpr = False):
    """Program (column block, d chunk, row split q): dT partial over its rows into slot q.
    TMA (with FULL): the I and T tiles come through tensor descriptors."""
    cb = tl.program_id(0)
    dc = tl.program_id(1)
    q = tl.program_id(2)
    s = tl.load(scale_ptr).to(tl.float32)
    coef = tl.load(coef_ptr).to(tl.float32)
    cols = cb * BN + tl.arange(0, BN)
    cmask = cols < B_C
    dd = dc * BD + tl.arange(0, BD)
    dmask = dd < D
    if TMA:
        I, T = _descriptors(I, T, B_R, B_C, D, sI, sT, BM, BN, BD)
        t = T.load([cb * BN, 0])
    elif FULL:
        t = tl.load(T + cols[:, None] * sT + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
    acc = tl.zeros((BN, BD), tl.float32)
    rb_lo = q * RB_PER
    for rb in range(rb_lo, tl.minimum(rb_lo + RB_PER, tl.cdiv(B_R, BM))):
        rows = rb * BM + tl.arange(0, BM)
        rmask = rows < B_R
        if TMA:
            a = I.load([rb * BM, 0])
        else:
            a = tl.load(I + rows[:, None] * sI + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        if FULL:  # S^T = T I^T, computed as such
            St = tl.dot(t, tl.trans(a), input_precision=PREC) * s
        else:
            St = _s_tile(T, I, cols, rows, cmask, rmask, s, D, sT, sI, BN, BM, BK, PREC)
        Gt = _g_tile(St, rows, cols, rmask, cmask, LSE_R, LSE_C, NPOS, G_R, G_C, TRANS=True)
        acc = tl.dot((Gt * GSCALE).to(a.dtype), a, acc, input_precision=PREC)
    out = DT + q * B_C * sDT + cols[:, None] * sDT + dd[None, :]
    tl.store(out, (acc * (s * coef / GSCALE)).to(DT.dtype.element_ty), mask=cmask[:, None] & dmask[None, :])


@triton.jit
def _bwd_fused(I, T, G_R, G_C, LSE_R, LSE_C, NPOS, DI, DT, GS, scale_ptr, coef_ptr, B_R, B_C, D, sI, sT,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
               GSCALE: tl.constexpr):
    """One program per (row block, column block): S recomputed exactly once, G formed once, then
    per d chunk two dots, dI += s G T and dT += s G^T I, accumulated with fp32 atomics."""
    rb = tl.program_id(0)
    cb = tl.program_id(1)
    s = tl.load(scale_ptr).to(tl.float32)
    coef = tl.load(coef_ptr).to(tl.float32)
    rows = rb * BM + tl.arange(0, BM)
    cols = cb * BN + tl.arange(0, BN)
    rmask = rows < B_R
    cmask = cols < B_C
    S = _s_tile(I, T, rows, cols, rmask, cmask, s, D, sI, sT, BM, BN, BK, PREC)
    G = _g_tile(S, rows, cols, rmask, cmask, LSE_R, LSE_C, NPOS, G_R, G_C)
    tl.atomic_add(GS + rows, tl.sum(G * S, 1) * (coef / s), mask=rmask)
    Gq = (G * GSCALE).to(I.dtype.element_ty)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        dmask = dd < D
        t = tl.load(T + cols[:, None] * sT + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        a = tl.load(I + rows[:, None] * sI + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        di = tl.dot(Gq, t, input_precision=PREC) * (s * coef / GSCALE)
        dt = tl.dot(tl.trans(Gq), a, input_precision=PREC) * (s * coef / GSCALE)
        tl.atomic_add(DI + rows[:, None] * D + dd[None, :], di, mask=rmask[:, None] & dmask[None, :])
        tl.atomic_add(DT + cols[:, None] * D + dd[None, :], dt, mask=cmask[:, None] & dmask[None, :])


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
def _finalize(M_R, L_R, POS, CMAX, CSUM, NPOS, LSE_R, LSE_C, LOSS_PART, B, Q, P, BLOCK: tl.constexpr):
    """One launch instead of ~20 small torch ops (at small b their launch latency is the cost):
    merge the row partials over Q splits and the column partials over P programs, and sum this
    block's share of the loss, 0.5 (lse_r + lse_c) - pos / n_pos."""
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
    tl.store(LOSS_PART + tl.program_id(0), tl.sum(tl.where(mask, 0.5 * (lse_r + lse_c) - pos / n, 0.0), 0))


# ---- launch ---------------------------------------------------------------------------------

def _prec(dtype: torch.dtype, tf32: bool) -> str:
    return "tf32" if (dtype == torch.float32 and tf32 and not INTERPRET) else "ieee"


def _gscale(dtype: torch.dtype) -> float:
    """G is cast to the operand dtype for the gradient dots; its small entries (p ~ 1/b) are
    subnormal in fp16, so fp16 scales G by 2^12 (|G| <= 1 keeps it far from fp16's max)."""
    return 4096.0 if dtype == torch.float16 else 1.0


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(1, n) - 1).bit_length())


FULL_ROW_BYTES = 1024  # FULL keeps whole [BM, pow2(d)] operand tiles in shared memory: bf16 d <= 512


def _as_tiles(c, d: int, itemsize: int = 2) -> dict:
    """(BM, BN, BK, BD, warps, stages[, flag[, maxnreg]]) -> launch dict. The flag switches each pass's
    option. Backward, FULL: the d chunk is the whole of d, so S needs no K loop and each tile of
    I and T is loaded once (rows wider than FULL_ROW_BYTES fall back to d chunks of BD). Forward,
    flag bit 1, FACTOR: the column sums reuse the rows' exponentials where the tile allows;
    bit 2, ONE_RB: a program per row block, whose column and K loops Triton flattens (_fwd_rows);
    bit 4, TMA: operands through tensor descriptors, where the inputs allow (tma_ok), in the
    forward and, with FULL, in the two-pass backward; bit 8, L1 (forward, pointer loads): the
    program's copies allocate in L1 (l1_copies.py), where its row block's reloads may hit.
    maxnreg (0: none) caps ptxas's registers per thread, so that more programs share an SM: the
    flattened 64 x 128 forward with 8 warps fits 128 with no spill (141 with TMA, 182 without),
    two programs per SM where one fits (compile_report; test_compile_report.py)."""
    flag = int(c[6]) if len(c) > 6 else 0
    full = bool(flag & 1) and _pow2(d) * itemsize <= FULL_ROW_BYTES
    return dict(BM=c[0], BN=c[1], BK=c[2], BD=_pow2(d) if full else min(c[3], _pow2(d)), FULL=full,
                FACTOR=bool(flag & 1), ONE_RB=bool(flag & 2), TMA=bool(flag & 4), L1=bool(flag & 8),
                num_warps=c[4], num_stages=c[5], maxnreg=(int(c[7]) or None) if len(c) > 7 else None)


def l2_bytes(b_r: int, b_c: int, d: int, itemsize: int, t: dict, which: str = "fwd") -> int:
    """Operand bytes a pass moves through L2 (counted from its tiles, not measured): every S tile
    with a K loop loads its BM x d rows of I and BN x d rows of T; FULL backward tiles keep one
    operand block for the whole program and stream the other; a d-chunked backward recomputes
    S per output-d chunk and loads the chunk of the dot operand besides. At b = 16,384 the
    default 64 x 128 forward moves 6.4 GB through L2 for 34 MB of inputs, so its ceiling is
    L2's read rate, not HBM's (kernels/l2_probe.py measures it)."""
    n_rb, n_cb = -(-b_r // t["BM"]), -(-b_c // t["BN"])
    if which == "fwd":
        return n_rb * n_cb * (t["BM"] + t["BN"]) * d * itemsize
    if t["FULL"]:  # rows pass: I block once, T streamed per row block; cols pass: the reverse
        return (n_rb * b_c + b_r + n_cb * b_r + b_c) * d * itemsize
    n_dc = -(-d // t["BD"])
    per_tile = (t["BM"] + t["BN"]) * d + (t["BN"] + t["BM"]) * t["BD"] // 2  # S, then the dot's operand chunk
    return 2 * n_dc * n_rb * n_cb * per_tile * itemsize


def tma_ok(*xs: torch.Tensor) -> bool:
    """Whether the copy engine can load these [rows, d] matrices: a contiguous last dimension,
    16-byte aligned base and row stride (bf16: d a multiple of 8). Others keep pointer loads.
    On GPU, device-side descriptors need a scratch allocator (_scratch_allocator)."""
    ok = all(x.stride(1) == 1 and x.stride(0) * x.element_size() % 16 == 0 and x.data_ptr() % 16 == 0 for x in xs)
    if ok and not INTERPRET and xs[0].is_cuda:
        _scratch_allocator()
    return ok


def _torch_scratch(size: int, alignment: int, stream):
    """Triton's scratch memory (128 bytes per descriptor and program) from torch's caching allocator."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _scratch_allocator():
    """Give Triton a scratch allocator in this thread unless one is set. Triton keeps it in a
    ContextVar, so each thread starts without one, the autograd engine's backward thread too:
    setting it once at the first forward would leave the backward's TMA kernels failing."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        unset = isinstance(_allocator.get(), NullAllocator)
    except ImportError:  # another Triton layout: set ours
        unset = True
    if unset:
        triton.set_allocator(_torch_scratch)


def _env_tiles(name: str):
    v = os.environ.get(name)
    return [int(x) for x in v.split(",")] if v else None


def pick_tiles(d: int, dtype: torch.dtype, which: str = "fwd") -> dict:
    """Fixed tiles: large in the interpreter (its cost is per operation); on GPU sized so that
    the output-d chunk stays in registers. `CTVLP_CLIP_TILES=BM,BN,BK,BD,warps,stages[,flag]`
    sets both passes, `CTVLP_CLIP_BWD_TILES` the backward alone."""
    env = (_env_tiles("CTVLP_CLIP_BWD_TILES") if which == "bwd" else None) or _env_tiles("CTVLP_CLIP_TILES")
    if env:
        return _as_tiles(env if len(env) >= 6 else env[:4] + [8, 2], d, dtype.itemsize)
    if INTERPRET:
        return _as_tiles((64, 64, min(128, _pow2(d)), 512, 4, 1, 0), d, dtype.itemsize)
    big = dtype in (torch.float16, torch.bfloat16)
    if which == "fwd":
        return _as_tiles((64, 128, 64, 128, 4, 3) if big else (64, 64, 32, 128, 8, 3), d)
    return _as_tiles((64, 64, 64, 512, 8, 2, 1) if big else (64, 64, 32, 128, 8, 3), d, dtype.itemsize)


# Candidate tiles (BM, BN, BK, BD, warps, stages[, flag]) for the autotuner on GPU, per pass.
# The 2026-11-22 H100 sweep (bf16, d=512, benchmarks/README.md) ranked the first of each fastest.
# The forward's FACTOR (flag bit 1), one-row-block (bit 2), TMA (bit 4) and L1 (bit 8) tiles
# join these once a GPU run has timed and tested them (benchmarks/loss_gpu.py sweeps them);
# until then the GPU default runs only measured code.
FWD_CANDIDATES = [(64, 128, 64, 128, 4, 3), (128, 128, 32, 128, 8, 4), (64, 64, 64, 128, 4, 3), (128, 64, 64, 128, 4, 3),
                  (128, 128, 64, 128, 8, 3)]
BWD_CANDIDATES = [(64, 64, 64, 512, 8, 2, 1), (64, 64, 64, 512, 8, 3), (64, 32, 64, 512, 8, 3, 1), (128, 64, 64, 256, 8, 3),
                  (64, 64, 32, 128, 8, 3)]
_TUNED: dict = {}


def _probe(I, T, n):
    """`n` rows to time candidates on: the inputs' own rows, repeated when b < n, so that a
    small batch is not tuned on launch latency alone and every b gets the same choice."""
    reps = triton.cdiv(n, I.shape[0])
    Ip, Tp = (x.repeat(reps, 1)[:n].contiguous() for x in (I, T))
    return Ip, Tp, torch.arange(n, dtype=torch.int32, device=I.device)


def autotune(I, T, s, g_rows, g_cols, tf32: bool, which: str = "fwd", candidates=None, probe_rows: int = 16384,
             time_fn=None) -> dict:
    """Time each candidate of one pass on `probe_rows` rows made of the real inputs and keep the
    fastest per (pass, d, dtype, device). Tiles depend on d and dtype, not on b, so a b = 1M
    batch is tuned at 16k rows. Candidates that fail to compile are skipped."""
    key = (which, I.shape[1], I.dtype, str(I.device), tf32)
    if key in _TUNED:
        return _TUNED[key]
    if candidates is None:
        candidates = FWD_CANDIDATES if which == "fwd" else BWD_CANDIDATES
    n = probe_rows
    Ip, Tp, gp = _probe(I, T[:I.shape[0]], n)
    time_fn = time_fn or _cuda_ms
    if which == "bwd":  # exact statistics for the slice, from the default forward tiles
        lse_r, cmax, csum, _ = triton_forward(Ip, Tp, s, gp, gp, tf32, tiles=pick_tiles(I.shape[1], I.dtype))
        lse_c = merge_column_stats(cmax, csum)
        ones = torch.ones(n, dtype=torch.float32, device=I.device)
    best, best_ms, tried = None, float("inf"), []
    for c in candidates:
        tiles = _as_tiles(c, I.shape[1], I.dtype.itemsize)
        if which == "fwd":
            def run():
                triton_forward(Ip, Tp, s, gp, gp, tf32, tiles=tiles)
        else:
            def run():
                triton_backward(Ip, Tp, s, gp, gp, lse_r, lse_c, ones, 1.0 / n, tf32, tiles=tiles)
        try:
            ms = time_fn(run)
        except Exception as e:  # out of shared memory / registers for this tile shape
            tried.append((c, f"{type(e).__name__}"))
            continue
        tried.append((c, round(ms, 3)))
        if ms < best_ms:
            best, best_ms = tiles, ms
    if best is None:
        raise RuntimeError(f"no {which} tile configuration compiled for d={I.shape[1]}, {I.dtype}: {tried}")
    _TUNED[key] = best
    return best


def _cuda_ms(fn, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def tiles_for(I, T, s, g_rows, g_cols, tf32: bool, which: str) -> dict:
    """The interpreter and CTVLP_CLIP_TILES use fixed tiles; on GPU the autotuner picks."""
    if INTERPRET or os.environ.get("CTVLP_CLIP_TILES") or (which == "bwd" and os.environ.get("CTVLP_CLIP_BWD_TILES")):
        return pick_tiles(I.shape[1], I.dtype, which)
    return autotune(I, T, s, g_rows, g_cols, tf32, which)


PART_BYTES = 1 << 30  # the forward's [P, b_c] column partials stay under this at any b
SPLIT_BYTES = 256 << 20  # fp32 gradient partials of a split backward stay under this


def _split(n_blocks: int, want: int) -> tuple[int, int]:
    """Split n_blocks into at most `want` contiguous ranges: (blocks per range, ranges)."""
    per = triton.cdiv(n_blocks, max(1, min(want, n_blocks)))
    return per, triton.cdiv(n_blocks, per)


def _fwd_grid(n_rb: int, n_cb: int, b_c: int, device, one_rb: bool = False) -> tuple[int, int, int, bool]:
    """(P row programs, column blocks per split, Q splits, ONE_RB). P is capped by the partials'
    memory; the column split fills the chip when there are few row blocks (small b). `one_rb`
    asks for a program per row block (the flattened loop), granted while its [n_rb, b_c]
    partials fit PART_BYTES; its column split aims at 16 programs per SM, so that the last wave
    of these long programs leaves few SMs idle. The interpreter uses 2 splits (and P = 2 when
    not one_rb) so the merges are exercised in CI."""
    if INTERPRET:
        return (n_rb, *_split(n_cb, 2), True) if one_rb else (min(n_rb, 2), *_split(n_cb, 2), False)
    sms = num_sms(device)
    if one_rb and n_rb * 8 * b_c <= PART_BYTES:
        return (n_rb, *_split(n_cb, triton.cdiv(16 * sms, n_rb)), True)
    P = max(1, min(n_rb, 2 * sms, PART_BYTES // (8 * b_c)))
    return (P, *_split(n_cb, triton.cdiv(4 * sms, P)), False)


def _bwd_split(n_blocks: int, n_other: int, n_dc: int, b_out: int, D: int, device) -> tuple[int, int]:
    """Split the reduction loop of a backward pass when its grid alone would leave SMs idle."""
    if INTERPRET:
        return _split(n_other, 2)
    want = min(triton.cdiv(4 * num_sms(device), n_blocks * n_dc), max(1, SPLIT_BYTES // (4 * b_out * D)))
    return _split(n_other, want)


def _launch_forward(I, T, s, g_rows, g_cols, tf32, tiles):
    """The forward kernel: row partials (max, sum, pos) [Q, b_r], column partials [P, b_c]."""
    b_r, D = I.shape
    b_c = T.shape[0]
    t = tiles or tiles_for(I, T, s, g_rows, g_cols, tf32, "fwd")
    n_rb, n_cb = triton.cdiv(b_r, t["BM"]), triton.cdiv(b_c, t["BN"])
    P, cb_per, Q, one_rb = _fwd_grid(n_rb, n_cb, b_c, I.device, t.get("ONE_RB", False))
    tma = t.get("TMA", False) and tma_ok(I, T)
    l1 = t.get("L1", False) and not tma  # the copy engine's loads do not go through L1
    if l1:
        from .l1_copies import install

        install()  # before the marked kernel can compile
    f32 = dict(dtype=torch.float32, device=I.device)
    m_r, l_r, pos = (torch.empty((Q, b_r), **f32) for _ in range(3))
    cmax, csum = torch.empty((P, b_c), **f32), torch.empty((P, b_c), **f32)  # the kernel initialises them
    _fwd[(P, Q)](I, T, g_rows, g_cols, m_r, l_r, pos, cmax, csum, s, b_r, b_c, D, I.stride(0), T.stride(0), cb_per,
                 BM=t["BM"], BN=t["BN"], BK=t["BK"], PREC=_prec(I.dtype, tf32), FACTOR=t.get("FACTOR", False), ONE_RB=one_rb,
                 TMA=tma, I_L1=l1, num_warps=t["num_warps"], num_stages=t["num_stages"],
                 maxnreg=t.get("maxnreg"))
    return m_r, l_r, pos, cmax, csum


def triton_forward(I, T, s, g_rows, g_cols, tf32: bool = True, tiles=None):
    """Returns row lse [b_r], column partials (max, sum) [P, b_c] and positives' logits [b_r]."""
    m_r, l_r, pos, cmax, csum = _launch_forward(I, T, s, g_rows, g_cols, tf32, tiles)
    lse_r = m_r[0] + torch.log(l_r[0]) if m_r.shape[0] == 1 else merge_column_stats(m_r, l_r)
    return lse_r, cmax, csum, pos.sum(0)


def triton_forward_loss(I, T, s, g_rows, g_cols, n_rows, tf32: bool = True, tiles=None):
    """Single process (b_r == b_c): the forward kernel, then one finalize launch. Returns row
    lse, column lse and the summed loss (a 0-d fp32 tensor)."""
    m_r, l_r, pos, cmax, csum = _launch_forward(I, T, s, g_rows, g_cols, tf32, tiles)
    b = I.shape[0]
    BLOCK = 1024
    nb = triton.cdiv(b, BLOCK)
    out = torch.empty(2 * b + nb, dtype=torch.float32, device=I.device)
    lse_r, lse_c, part = out[:b], out[b:2 * b], out[2 * b:]
    _finalize[(nb,)](m_r, l_r, pos, cmax, csum, n_rows, lse_r, lse_c, part, b, m_r.shape[0], cmax.shape[0], BLOCK=BLOCK)
    return lse_r, lse_c, part.sum()


def triton_backward(I, T, s, g_rows, g_cols, lse_r, lse_c, n_rows, coef, tf32: bool = True, grad_dtype=None, tiles=None,
                    variant: str = "two_pass"):
    """Gradients are stored in `grad_dtype` (default: the input dtype), accumulated in fp32;
    the distributed path asks for fp32 dT because it is summed across ranks afterwards.

    variant "two_pass" (default): dI over row blocks and dT over column blocks, S recomputed once
    per direction, no atomics, deterministic. "fused": S recomputed once, dI and dT by atomics.
    "panel" (contrastive_panel.py): S recomputed once, G through bounded row panels, dI and dT
    by GEMMs with large tiles, deterministic.
    When a pass has too few blocks to fill the chip, its reduction loop is split and the fp32
    partials are summed (still deterministic)."""
    b_r, D = I.shape
    b_c = T.shape[0]
    if variant == "panel":
        from .contrastive_panel import panel_backward

        return panel_backward(I, T, s, g_rows, g_cols, lse_r, lse_c, n_rows, coef, tf32, grad_dtype)
    if variant not in ("two_pass", "fused"):
        raise ValueError(f"backward variant must be two_pass, fused or panel, got {variant!r}")
    t = tiles or tiles_for(I, T, s, g_rows, g_cols, tf32, "bwd")
    if variant == "fused":
        return _backward_fused(I, T, s, g_rows, g_cols, lse_r, lse_c, n_rows, coef, tf32, grad_dtype, t)
    coef_t = torch.as_tensor(coef, dtype=torch.float32, device=I.device).reshape(1)
    common = dict(BM=t["BM"], BN=t["BN"], BK=t["BK"], BD=t["BD"], FULL=t["FULL"], PREC=_prec(I.dtype, tf32),
                  GSCALE=_gscale(I.dtype), TMA=t.get("TMA", False) and t["FULL"] and tma_ok(I, T),
                  num_warps=t["num_warps"], num_stages=t["num_stages"], maxnreg=t.get("maxnreg"))
    n_rb, n_cb, n_dc = triton.cdiv(b_r, t["BM"]), triton.cdiv(b_c, t["BN"]), triton.cdiv(D, t["BD"])
    f32 = dict(dtype=torch.float32, device=I.device)

    cb_per, Qc = _bwd_split(n_rb, n_cb, n_dc, b_r, D, I.device)
    dI = torch.empty((Qc, b_r, D), **f32) if Qc > 1 else torch.empty((1, b_r, D), dtype=I.dtype, device=I.device)
    gs = torch.empty((Qc, b_r), **f32)
    _bwd_rows[(n_rb, n_dc, Qc)](I, T, g_rows, g_cols, lse_r, lse_c, n_rows, dI, gs, s, coef_t, b_r, b_c, D,
                                I.stride(0), T.stride(0), D, cb_per, **common)
    dI = dI.sum(0).to(I.dtype) if Qc > 1 else dI[0]

    rb_per, Qr = _bwd_split(n_cb, n_rb, n_dc, b_c, D, I.device)
    dT = torch.empty((Qr, b_c, D), **f32) if Qr > 1 else torch.empty((1, b_c, D), dtype=grad_dtype or I.dtype,
                                                                     device=I.device)
    _bwd_cols[(n_cb, n_dc, Qr)](I, T, g_rows, g_cols, lse_r, lse_c, n_rows, dT, s, coef_t, b_r, b_c, D,
                                I.stride(0), T.stride(0), D, rb_per, **common)
    dT = dT.sum(0).to(grad_dtype or I.dtype) if Qr > 1 else dT[0]
    return dI, dT, gs.sum()


def _backward_fused(I, T, s, g_rows, g_cols, lse_r, lse_c, n_rows, coef, tf32, grad_dtype, t):
    b_r, D = I.shape
    b_c = T.shape[0]
    dI = torch.zeros((b_r, D), dtype=torch.float32, device=I.device)
    dT = torch.zeros((b_c, D), dtype=torch.float32, device=I.device)
    gs = torch.zeros(b_r, dtype=torch.float32, device=I.device)
    coef_t = torch.as_tensor(coef, dtype=torch.float32, device=I.device).reshape(1)
    grid = (triton.cdiv(b_r, t["BM"]), triton.cdiv(b_c, t["BN"]))
    # two [BM|BN, BD] operand tiles beside S: a 128-wide d chunk keeps them inside shared memory
    _bwd_fused[grid](I.contiguous(), T.contiguous(), g_rows, g_cols, lse_r, lse_c, n_rows, dI, dT, gs, s, coef_t,
                     b_r, b_c, D, I.stride(0), T.stride(0), BM=t["BM"], BN=t["BN"], BK=t["BK"], BD=min(t["BD"], 128),
                     PREC=_prec(I.dtype, tf32), GSCALE=_gscale(I.dtype), num_warps=t["num_warps"],
                     num_stages=t["num_stages"])
    return dI.to(I.dtype), dT.to(grad_dtype or I.dtype), gs.sum()
