"""Untimed variants of the contrastive loss's Triton kernels, for the GPU sweep to time
(benchmarks/loss_gpu.py) and their tests (test_loss_variants.py). Production (kernels/
contrastive_triton.py) runs none of this until a GPU run has measured a variant faster and its
CUDA tests have passed on the chip.

Tiles are "BM,BN,BK,BD,warps,stages[,flag[,maxnreg]]". Forward flag bits: 1 FACTOR (the column
sums reuse the rows' exponentials where the tile's lse span allows); 2 ONE_RB (a program per row
block, whose column and K loops Triton flattens into one pipelined loop); 4 TMA (operand blocks
through tensor descriptors, where the inputs allow, in the forward and, with FULL, the two-pass
backward); 8 L1 (the forward's I copies allocate in L1, l1_copies.py). Backward flag bit 1 is
FULL (whole d per tile). An eighth number caps ptxas's registers per thread (maxnreg).

    variant_clip_loss(I, T, s, group_ids=None, fwd="64,128,64,128,8,3,7,128", bwd="64,64,64,512,8,2,1",
                      backward="two_pass" | "panel", panel=PanelConfig(...))

is one process's loss on these kernels (production's finalize merges the partials), with
autograd, so that each variant is checked end to end against the fp64 reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.contrastive_ref import merge_column_stats, positives_count
from kernels.contrastive_triton import (FULL_ROW_BYTES, INTERPRET, PART_BYTES, bwd_split, col_partials,
                                        col_sums_own_max, finalize, gscale, merge_max_sum, pow2, prec, split)
from kernels.device import num_sms


@triton.jit
def variant_s_tile(I, T, rows, cols, rmask, cmask, s, D, sI, sT, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            PREC: tl.constexpr, r0=0, c0=0, TMA: tl.constexpr = False, I_L1: tl.constexpr = False):
    """s * I[rows] @ T[cols]^T in fp32, looping over d in BK chunks. TMA: I and T are tensor
    descriptors (descriptors) and the tile is rows [r0, r0 + BM) x cols [c0, c0 + BN): the copy
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
def descriptors(I, T, B_R, B_C, D, sI, sT, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Tensor descriptors of I and T in [BM, BK] and [BN, BK] blocks, for variant_s_tile's TMA loads."""
    return (tl.make_tensor_descriptor(I, [B_R, D], [sI, 1], [BM, BK]),
            tl.make_tensor_descriptor(T, [B_C, D], [sT, 1], [BN, BK]))


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
            p_max, p_sum = col_partials(CMAX, CSUM, pid, B_C, cols, cmask, rb)
        S = variant_s_tile(I, T, rows, cols, rmask, cmask, s, D, sI, sT, BM, BN, BK, PREC, rb * BM, cb * BN, TMA, I_L1)
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
                t_sum, t_ref = col_sums_own_max(S, t_max), t_max
        else:
            t_sum, t_ref = col_sums_own_max(S, t_max), t_max
            if not ONE_RB:
                p_max, p_sum = col_partials(CMAX, CSUM, pid, B_C, cols, cmask, rb)
        if ONE_RB:  # the slot's first and only tile for these columns
            n_max, p_sum = t_ref, t_sum
        else:  # merge into the program's own partial slot
            n_max, p_sum = merge_max_sum(p_max, p_sum, t_ref, t_sum)
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
    TMA: the operands are loaded through tensor descriptors (variant_s_tile). I_L1: variant_s_tile's."""
    pid = tl.program_id(0)
    q = tl.program_id(1)
    s = tl.load(scale_ptr).to(tl.float32)
    cb_lo = q * CB_PER
    cb_hi = tl.minimum(cb_lo + CB_PER, tl.cdiv(B_C, BN))
    if TMA:
        I, T = descriptors(I, T, B_R, B_C, D, sI, sT, BM, BN, BK)
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
def half_softmax_sum(S, lr, lc, rmask, cmask, TRANS: tl.constexpr, FACTOR: tl.constexpr, SPAN: tl.constexpr = 50.0):
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
def variant_g_tile(S, rows, cols, rmask, cmask, LSE_R, LSE_C, NPOS, G_R, G_C, TRANS: tl.constexpr = False,
            FACTOR: tl.constexpr = False):
    """dLoss/dS on one tile (sum reduction, before coef), both directions, from the stored row
    and column lse. Entries lie in [-1, 1]; coef (1/b for the mean) is applied after the dots,
    so that fp16 operands do not underflow. TRANS: S is given as S^T [cols, rows] and G^T comes
    out, in the layout of the dT dot's left operand, so no register tile is transposed (on sm_90
    that cost a shared-memory round trip and spilled 544 bytes per thread in the column pass).
    FACTOR: one exponential per element where the tile allows (half_softmax_sum); the two-pass
    kernels keep two, since the second branch pushes their d-wide accumulators into spills."""
    lr = tl.load(LSE_R + rows, mask=rmask, other=0.0)
    lc = tl.load(LSE_C + cols, mask=cmask, other=0.0)
    npos = tl.load(NPOS + rows, mask=rmask, other=1.0)
    g_r = tl.load(G_R + rows, mask=rmask, other=-1)
    g_c = tl.load(G_C + cols, mask=cmask, other=-2)
    p = half_softmax_sum(S, lr, lc, rmask, cmask, TRANS, FACTOR)
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
        I, T = descriptors(I, T, B_R, B_C, D, sI, sT, BM, BN, BD)
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
            S = variant_s_tile(I, T, rows, cols, rmask, cmask, s, D, sI, sT, BM, BN, BK, PREC)
        G = variant_g_tile(S, rows, cols, rmask, cmask, LSE_R, LSE_C, NPOS, G_R, G_C)
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
        I, T = descriptors(I, T, B_R, B_C, D, sI, sT, BM, BN, BD)
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
            St = variant_s_tile(T, I, cols, rows, cmask, rmask, s, D, sT, sI, BN, BM, BK, PREC)
        Gt = variant_g_tile(St, rows, cols, rmask, cmask, LSE_R, LSE_C, NPOS, G_R, G_C, TRANS=True)
        acc = tl.dot((Gt * GSCALE).to(a.dtype), a, acc, input_precision=PREC)
    out = DT + q * B_C * sDT + cols[:, None] * sDT + dd[None, :]
    tl.store(out, (acc * (s * coef / GSCALE)).to(DT.dtype.element_ty), mask=cmask[:, None] & dmask[None, :])


# ---- launch ---------------------------------------------------------------------------------

def as_tiles(c, d: int, itemsize: int = 2) -> dict:
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
    full = bool(flag & 1) and pow2(d) * itemsize <= FULL_ROW_BYTES
    return dict(BM=c[0], BN=c[1], BK=c[2], BD=pow2(d) if full else min(c[3], pow2(d)), FULL=full,
                FACTOR=bool(flag & 1), ONE_RB=bool(flag & 2), TMA=bool(flag & 4), L1=bool(flag & 8),
                num_warps=c[4], num_stages=c[5], maxnreg=(int(c[7]) or None) if len(c) > 7 else None)


def l2_bytes(b_r: int, b_c: int, d: int, itemsize: int, t: dict, which: str = "fwd") -> int:
    """Operand bytes a pass moves through L2 (counted from its tiles, not measured): every S tile
    with a K loop loads its BM x d rows of I and BN x d rows of T; FULL backward tiles keep one
    operand block for the whole program and stream the other; a d-chunked backward recomputes
    S per output-d chunk and loads the chunk of the dot operand besides. At b = 16,384 the
    default 64 x 128 forward moves 6.4 GB through L2 for 34 MB of inputs, so its ceiling is
    L2's read rate, not HBM's (tuning/l2_probe.py measures it)."""
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


def _fwd_grid(n_rb: int, n_cb: int, b_c: int, device, one_rb: bool = False) -> tuple[int, int, int, bool]:
    """(P row programs, column blocks per split, Q splits, ONE_RB). P is capped by the partials'
    memory; the column split fills the chip when there are few row blocks (small b). `one_rb`
    asks for a program per row block (the flattened loop), granted while its [n_rb, b_c]
    partials fit PART_BYTES; its column split aims at 16 programs per SM, so that the last wave
    of these long programs leaves few SMs idle. The interpreter uses 2 splits (and P = 2 when
    not one_rb) so the merges are exercised in CI."""
    if INTERPRET:
        return (n_rb, *split(n_cb, 2), True) if one_rb else (min(n_rb, 2), *split(n_cb, 2), False)
    sms = num_sms(device)
    if one_rb and n_rb * 8 * b_c <= PART_BYTES:
        return (n_rb, *split(n_cb, triton.cdiv(16 * sms, n_rb)), True)
    P = max(1, min(n_rb, 2 * sms, PART_BYTES // (8 * b_c)))
    return (P, *split(n_cb, triton.cdiv(4 * sms, P)), False)


def parse_tiles(t, d: int, itemsize: int = 2) -> dict:
    """A tile string "BM,BN,BK,BD,warps,stages[,flag[,maxnreg]]", a tuple, or a launch dict."""
    if isinstance(t, dict):
        return t
    if isinstance(t, str):
        t = [int(x) for x in t.split(",")]
    return as_tiles(t, d, itemsize)


def launch_forward(I, T, s, g_rows, g_cols, tf32, tiles):
    """The variant forward kernel: row partials (max, sum, pos) [Q, b_r], column partials [P, b_c]."""
    b_r, D = I.shape
    b_c = T.shape[0]
    t = parse_tiles(tiles, D, I.element_size())
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
                 BM=t["BM"], BN=t["BN"], BK=t["BK"], PREC=prec(I.dtype, tf32), FACTOR=t.get("FACTOR", False),
                 ONE_RB=one_rb, TMA=tma, I_L1=l1, num_warps=t["num_warps"], num_stages=t["num_stages"],
                 maxnreg=t.get("maxnreg"))
    return m_r, l_r, pos, cmax, csum


def triton_forward(I, T, s, g_rows, g_cols, tf32: bool = True, tiles=None):
    """Row lse [b_r], column partials (max, sum) [P, b_c], positives' logits [b_r]."""
    m_r, l_r, pos, cmax, csum = launch_forward(I, T, s, g_rows, g_cols, tf32, tiles)
    lse_r = m_r[0] + torch.log(l_r[0]) if m_r.shape[0] == 1 else merge_column_stats(m_r, l_r)
    return lse_r, cmax, csum, pos.sum(0)


def triton_backward(I, T, s, g_rows, g_cols, lse_r, lse_c, n_rows, coef, tf32: bool = True, grad_dtype=None,
                    tiles=None):
    """The two-pass backward (production's algorithm) with TMA tiles and register caps: dI over
    row blocks, dT over column blocks, S recomputed once per direction, deterministic."""
    b_r, D = I.shape
    b_c = T.shape[0]
    t = parse_tiles(tiles, D, I.element_size())
    coef_t = torch.as_tensor(coef, dtype=torch.float32, device=I.device).reshape(1)
    common = dict(BM=t["BM"], BN=t["BN"], BK=t["BK"], BD=t["BD"], FULL=t["FULL"], PREC=prec(I.dtype, tf32),
                  GSCALE=gscale(I.dtype), TMA=t.get("TMA", False) and t["FULL"] and tma_ok(I, T),
                  num_warps=t["num_warps"], num_stages=t["num_stages"], maxnreg=t.get("maxnreg"))
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


class _VariantLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, I, T, s, g, fwd, bwd, backward, panel, tf32):
        I, T = I.contiguous(), T.contiguous()
        s1 = s.detach().reshape(1).float().contiguous()
        n_rows = positives_count(g, g).float()
        lse_r, lse_c, loss = finalize(*launch_forward(I, T, s1, g, g, tf32, fwd), n_rows, g)
        ctx.save_for_backward(I, T, s1, g, lse_r, lse_c, n_rows)
        ctx.cfg = (bwd, backward, panel, tf32, s.dtype, s.shape)
        return loss / I.shape[0]

    @staticmethod
    def backward(ctx, grad_out):
        I, T, s1, g, lse_r, lse_c, n_rows = ctx.saved_tensors
        bwd, backward, panel, tf32, s_dtype, s_shape = ctx.cfg
        coef = grad_out.float() / I.shape[0]
        if backward == "panel":
            from .panel import panel_backward

            dI, dT, gs = panel_backward(I, T, s1, g, g, lse_r, lse_c, n_rows, coef, tf32, config=panel)
        elif backward == "two_pass":
            dI, dT, gs = triton_backward(I, T, s1, g, g, lse_r, lse_c, n_rows, coef, tf32, tiles=bwd)
        else:
            raise ValueError(f"backward must be two_pass or panel, got {backward!r}")
        return dI, dT, gs.to(s_dtype).reshape(s_shape), None, None, None, None, None, None


def variant_clip_loss(I, T, logit_scale, *, group_ids=None, fwd, bwd=None, backward: str = "two_pass", panel=None,
                      tf32: bool = True):
    """Mean symmetric InfoNCE of one process on the variant kernels: `fwd`/`bwd` tiles (strings
    or tuples, see the module doc), `backward` two_pass or panel (`panel`: a PanelConfig)."""
    if bwd is None and backward == "two_pass":
        raise ValueError("the two-pass backward needs bwd tiles")
    g = (group_ids if group_ids is not None else torch.arange(I.shape[0], device=I.device)).to(I.device, torch.int32)
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), device=I.device)
    return _VariantLoss.apply(I, T, logit_scale, g.contiguous(), fwd, bwd, backward, panel, tf32)
