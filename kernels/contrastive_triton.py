"""Triton kernels of the blockwise symmetric InfoNCE (see contrastive_ref.py for the math).

Forward, one pass over S: program p owns row blocks p, p+P, ...; per tile it keeps the online
row max/sum in registers and merges the tile's column max/sum into its own slot of a [P, b_c]
partial buffer (no atomics, deterministic). Memory is O(P * b_c), never b_r x b_c.
Backward: `_bwd_rows` (one program per row block and output-d chunk) recomputes the S tiles,
forms G in-tile from both directions and accumulates dI = s G T and sum(G S); `_bwd_cols` does
the same per column block for dT = s G^T I. Masking handles any b and any d.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _s_tile(I, T, rows, cols, rmask, cmask, s, D, sI, sT, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
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
def _fwd(I, T, G_R, G_C, LSE_R, POS, CMAX, CSUM, scale_ptr, B_R, B_C, D, sI, sT,
         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    s = tl.load(scale_ptr).to(tl.float32)
    n_rb = tl.cdiv(B_R, BM)
    for rb in range(pid, n_rb, nprog):
        rows = rb * BM + tl.arange(0, BM)
        rmask = rows < B_R
        g_r = tl.load(G_R + rows, mask=rmask, other=-1)
        m_i = tl.full((BM,), -float("inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        pos = tl.zeros((BM,), tl.float32)
        for cb in range(0, tl.cdiv(B_C, BN)):
            cols = cb * BN + tl.arange(0, BN)
            cmask = cols < B_C
            S = _s_tile(I, T, rows, cols, rmask, cmask, s, D, sI, sT, BM, BN, BK, PREC)
            valid = rmask[:, None] & cmask[None, :]
            S = tl.where(valid, S, -float("inf"))
            # rows: online log-sum-exp
            m_new = tl.maximum(m_i, tl.max(S, 1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(S - m_safe[:, None]), 1)
            m_i = m_new
            # positives, computed in-tile from the group ids (never a b x b target matrix)
            g_c = tl.load(G_C + cols, mask=cmask, other=-2)
            pos += tl.sum(tl.where(valid & (g_r[:, None] == g_c[None, :]), S, 0.0), 1)
            # columns: merge this tile into the program's own partial slot
            t_max = tl.max(S, 0)
            t_safe = tl.where(t_max == -float("inf"), 0.0, t_max)
            t_sum = tl.sum(tl.exp(S - t_safe[None, :]), 0)
            p_max = tl.load(CMAX + pid * B_C + cols, mask=cmask, other=-float("inf"))
            p_sum = tl.load(CSUM + pid * B_C + cols, mask=cmask, other=0.0)
            n_max = tl.maximum(p_max, t_max)
            n_safe = tl.where(n_max == -float("inf"), 0.0, n_max)
            p_sum = p_sum * tl.exp(p_max - n_safe) + t_sum * tl.exp(t_max - n_safe)
            tl.store(CMAX + pid * B_C + cols, n_max, mask=cmask)
            tl.store(CSUM + pid * B_C + cols, p_sum, mask=cmask)
        tl.store(LSE_R + rows, m_i + tl.log(tl.where(rmask, l_i, 1.0)), mask=rmask)
        tl.store(POS + rows, pos, mask=rmask)


@triton.jit
def _g_tile(S, rows, cols, rmask, cmask, LSE_R, LSE_C, NPOS, G_R, G_C, coef):
    """dLoss/dS on one tile, both directions, from the stored row and column lse."""
    lr = tl.load(LSE_R + rows, mask=rmask, other=0.0)
    lc = tl.load(LSE_C + cols, mask=cmask, other=0.0)
    npos = tl.load(NPOS + rows, mask=rmask, other=1.0)
    g_r = tl.load(G_R + rows, mask=rmask, other=-1)
    g_c = tl.load(G_C + cols, mask=cmask, other=-2)
    valid = rmask[:, None] & cmask[None, :]
    p = 0.5 * (tl.exp(S - lr[:, None]) + tl.exp(S - lc[None, :]))
    t = tl.where(g_r[:, None] == g_c[None, :], 1.0 / npos[:, None], 0.0)
    return tl.where(valid, coef * (p - t), 0.0)


@triton.jit
def _bwd_rows(I, T, G_R, G_C, LSE_R, LSE_C, NPOS, DI, GS, scale_ptr, coef_ptr, B_R, B_C, D, sI, sT, sDI,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    rb = tl.program_id(0)
    dc = tl.program_id(1)
    s = tl.load(scale_ptr).to(tl.float32)
    coef = tl.load(coef_ptr).to(tl.float32)
    rows = rb * BM + tl.arange(0, BM)
    rmask = rows < B_R
    dd = dc * BD + tl.arange(0, BD)
    dmask = dd < D
    acc = tl.zeros((BM, BD), tl.float32)
    gs = tl.zeros((BM,), tl.float32)
    for cb in range(0, tl.cdiv(B_C, BN)):
        cols = cb * BN + tl.arange(0, BN)
        cmask = cols < B_C
        S = _s_tile(I, T, rows, cols, rmask, cmask, s, D, sI, sT, BM, BN, BK, PREC)
        G = _g_tile(S, rows, cols, rmask, cmask, LSE_R, LSE_C, NPOS, G_R, G_C, coef)
        gs += tl.sum(G * S, 1)
        t = tl.load(T + cols[:, None] * sT + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(G.to(t.dtype), t, acc, input_precision=PREC)
    tl.store(DI + rows[:, None] * sDI + dd[None, :], (acc * s).to(DI.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    if dc == 0:
        tl.store(GS + rows, gs / s, mask=rmask)


@triton.jit
def _bwd_cols(I, T, G_R, G_C, LSE_R, LSE_C, NPOS, DT, scale_ptr, coef_ptr, B_R, B_C, D, sI, sT, sDT,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    cb = tl.program_id(0)
    dc = tl.program_id(1)
    s = tl.load(scale_ptr).to(tl.float32)
    coef = tl.load(coef_ptr).to(tl.float32)
    cols = cb * BN + tl.arange(0, BN)
    cmask = cols < B_C
    dd = dc * BD + tl.arange(0, BD)
    dmask = dd < D
    acc = tl.zeros((BN, BD), tl.float32)
    for rb in range(0, tl.cdiv(B_R, BM)):
        rows = rb * BM + tl.arange(0, BM)
        rmask = rows < B_R
        S = _s_tile(I, T, rows, cols, rmask, cmask, s, D, sI, sT, BM, BN, BK, PREC)
        G = _g_tile(S, rows, cols, rmask, cmask, LSE_R, LSE_C, NPOS, G_R, G_C, coef)
        a = tl.load(I + rows[:, None] * sI + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(tl.trans(G.to(a.dtype)), a, acc, input_precision=PREC)
    tl.store(DT + cols[:, None] * sDT + dd[None, :], (acc * s).to(DT.dtype.element_ty), mask=cmask[:, None] & dmask[None, :])


@triton.jit
def _bwd_fused(I, T, G_R, G_C, LSE_R, LSE_C, NPOS, DI, DT, GS, scale_ptr, coef_ptr, B_R, B_C, D, sI, sT,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
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
    G = _g_tile(S, rows, cols, rmask, cmask, LSE_R, LSE_C, NPOS, G_R, G_C, coef)
    tl.atomic_add(GS + rows, tl.sum(G * S, 1) / s, mask=rmask)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        dmask = dd < D
        t = tl.load(T + cols[:, None] * sT + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        a = tl.load(I + rows[:, None] * sI + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        di = tl.dot(G.to(t.dtype), t, input_precision=PREC) * s
        dt = tl.dot(tl.trans(G.to(a.dtype)), a, input_precision=PREC) * s
        tl.atomic_add(DI + rows[:, None] * D + dd[None, :], di, mask=rmask[:, None] & dmask[None, :])
        tl.atomic_add(DT + cols[:, None] * D + dd[None, :], dt, mask=cmask[:, None] & dmask[None, :])


# ---- launch ---------------------------------------------------------------------------------

def _prec(dtype: torch.dtype, tf32: bool) -> str:
    return "tf32" if (dtype == torch.float32 and tf32 and not INTERPRET) else "ieee"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(1, n) - 1).bit_length())


def pick_tiles(d: int, dtype: torch.dtype) -> dict:
    """Tile sizes: large in the interpreter (its cost is per operation); on GPU sized so that
    the output-d chunk stays in registers. Tunable by `CTVLP_CLIP_TILES=BM,BN,BK,BD[,warps,stages]`."""
    env = os.environ.get("CTVLP_CLIP_TILES")
    if env:
        v = [int(x) for x in env.split(",")]
        w, st = (v[4], v[5]) if len(v) == 6 else (8, 2)
        return dict(BM=v[0], BN=v[1], BK=v[2], BD=min(v[3], _pow2(d)), num_warps=w, num_stages=st)
    if INTERPRET:
        return dict(BM=64, BN=64, BK=min(128, _pow2(d)), BD=min(512, _pow2(d)), num_warps=4, num_stages=1)
    big = dtype in (torch.float16, torch.bfloat16)
    return dict(BM=128 if big else 64, BN=128 if big else 64, BK=64 if big else 32, BD=min(256 if big else 128, _pow2(d)),
                num_warps=8, num_stages=3)


# Candidate tiles (BM, BN, BK, BD, warps, stages) for the autotuner on GPU.
CANDIDATES = [(128, 128, 64, 128, 8, 3), (128, 128, 64, 256, 8, 3), (128, 64, 64, 256, 8, 3), (64, 128, 64, 256, 4, 3),
              (128, 128, 64, 512, 8, 2), (64, 64, 64, 512, 4, 2), (128, 128, 32, 128, 8, 4), (64, 64, 64, 128, 4, 4)]
_TUNED: dict = {}


def _as_tiles(c, d: int) -> dict:
    return dict(BM=c[0], BN=c[1], BK=c[2], BD=min(c[3], _pow2(d)), num_warps=c[4], num_stages=c[5])


def autotune(I, T, s, g_rows, g_cols, tf32: bool, candidates=CANDIDATES, probe_rows: int = 16384, time_fn=None) -> dict:
    """Time forward+backward of each candidate on a slice (at most `probe_rows`) of the real
    inputs and keep the fastest per (d, dtype, device). Tiles depend on d and dtype, not on b,
    so a b = 1M batch is tuned at 16k rows. Candidates that fail to compile are skipped."""
    key = (I.shape[1], I.dtype, str(I.device), tf32)
    if key in _TUNED:
        return _TUNED[key]
    n = min(I.shape[0], T.shape[0], probe_rows)
    Ip, Tp, gp = I[:n].contiguous(), T[:n].contiguous(), g_cols[:n].contiguous()
    time_fn = time_fn or _cuda_ms
    best, best_ms, tried = None, float("inf"), []
    for c in candidates:
        tiles = _as_tiles(c, I.shape[1])
        def run():
            lse_r, cmax, csum, _ = triton_forward(Ip, Tp, s, gp, gp, tf32, tiles=tiles)
            lse_c = cmax.max(0).values + torch.log((csum * torch.exp(cmax - cmax.max(0).values)).sum(0))
            n_rows = torch.ones(n, dtype=torch.float32, device=I.device)
            triton_backward(Ip, Tp, s, gp, gp, lse_r, lse_c, n_rows, 1.0 / n, tf32, tiles=tiles)
        try:
            ms = time_fn(run)
        except Exception as e:  # out of shared memory / registers for this tile shape
            tried.append((c, f"{type(e).__name__}"))
            continue
        tried.append((c, round(ms, 3)))
        if ms < best_ms:
            best, best_ms = tiles, ms
    if best is None:
        raise RuntimeError(f"no tile configuration compiled for d={I.shape[1]}, {I.dtype}: {tried}")
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


def tiles_for(I, T, s, g_rows, g_cols, tf32: bool) -> dict:
    """The interpreter and CTVLP_CLIP_TILES use fixed tiles; on GPU the autotuner picks."""
    if INTERPRET or os.environ.get("CTVLP_CLIP_TILES"):
        return pick_tiles(I.shape[1], I.dtype)
    return autotune(I, T, s, g_rows, g_cols, tf32)


def triton_forward(I, T, s, g_rows, g_cols, tf32: bool = True, tiles=None):
    b_r, D = I.shape
    b_c = T.shape[0]
    t = tiles or tiles_for(I, T, s, g_rows, g_cols, tf32)
    n_rb = triton.cdiv(b_r, t["BM"])
    if INTERPRET:
        P = n_rb
    else:
        # one program per SM: the [P, b_c] column partials are the kernel's only large buffer
        P = min(n_rb, torch.cuda.get_device_properties(I.device).multi_processor_count)
    lse_r = torch.empty(b_r, dtype=torch.float32, device=I.device)
    pos = torch.empty(b_r, dtype=torch.float32, device=I.device)
    cmax = torch.full((P, b_c), -float("inf"), dtype=torch.float32, device=I.device)
    csum = torch.zeros((P, b_c), dtype=torch.float32, device=I.device)
    _fwd[(P,)](I, T, g_rows, g_cols, lse_r, pos, cmax, csum, s, b_r, b_c, D, I.stride(0), T.stride(0),
               BM=t["BM"], BN=t["BN"], BK=t["BK"], PREC=_prec(I.dtype, tf32), num_warps=t["num_warps"],
               num_stages=t["num_stages"])
    return lse_r, cmax, csum, pos


def triton_backward(I, T, s, g_rows, g_cols, lse_r, lse_c, n_rows, coef, tf32: bool = True, grad_dtype=None, tiles=None,
                    variant: str = "two_pass"):
    """Gradients are stored in `grad_dtype` (default: the input dtype), accumulated in fp32;
    the distributed path asks for fp32 dT because it is summed across ranks afterwards.

    variant "two_pass" (default): dI over row blocks and dT over column blocks, S recomputed once
    per direction, no atomics, deterministic. "fused": S recomputed once, dI and dT by atomics."""
    b_r, D = I.shape
    b_c = T.shape[0]
    t = tiles or tiles_for(I, T, s, g_rows, g_cols, tf32)
    if variant == "fused":
        return _backward_fused(I, T, s, g_rows, g_cols, lse_r, lse_c, n_rows, coef, tf32, grad_dtype, t)
    if variant != "two_pass":
        raise ValueError(f"backward variant must be two_pass or fused, got {variant!r}")
    dI = torch.empty((b_r, D), dtype=I.dtype, device=I.device)
    dT = torch.empty((b_c, D), dtype=grad_dtype or I.dtype, device=I.device)
    gs = torch.empty(b_r, dtype=torch.float32, device=I.device)
    coef_t = torch.as_tensor(coef, dtype=torch.float32, device=I.device).reshape(1)
    common = dict(BM=t["BM"], BN=t["BN"], BK=t["BK"], BD=t["BD"], PREC=_prec(I.dtype, tf32), num_warps=t["num_warps"],
                  num_stages=t["num_stages"])
    n_dc = triton.cdiv(D, t["BD"])
    _bwd_rows[(triton.cdiv(b_r, t["BM"]), n_dc)](I, T, g_rows, g_cols, lse_r, lse_c, n_rows, dI, gs, s, coef_t,
                                                  b_r, b_c, D, I.stride(0), T.stride(0), dI.stride(0), **common)
    _bwd_cols[(triton.cdiv(b_c, t["BN"]), n_dc)](I, T, g_rows, g_cols, lse_r, lse_c, n_rows, dT, s, coef_t,
                                                  b_r, b_c, D, I.stride(0), T.stride(0), dT.stride(0), **common)
    return dI, dT, gs.sum()


def _backward_fused(I, T, s, g_rows, g_cols, lse_r, lse_c, n_rows, coef, tf32, grad_dtype, t):
    b_r, D = I.shape
    b_c = T.shape[0]
    dI = torch.zeros((b_r, D), dtype=torch.float32, device=I.device)
    dT = torch.zeros((b_c, D), dtype=torch.float32, device=I.device)
    gs = torch.zeros(b_r, dtype=torch.float32, device=I.device)
    coef_t = torch.as_tensor(coef, dtype=torch.float32, device=I.device).reshape(1)
    grid = (triton.cdiv(b_r, t["BM"]), triton.cdiv(b_c, t["BN"]))
    _bwd_fused[grid](I.contiguous(), T.contiguous(), g_rows, g_cols, lse_r, lse_c, n_rows, dI, dT, gs, s, coef_t,
                     b_r, b_c, D, I.stride(0), T.stride(0), BM=t["BM"], BN=t["BN"], BK=t["BK"], BD=t["BD"],
                     PREC=_prec(I.dtype, tf32), num_warps=t["num_warps"], num_stages=t["num_stages"])
    return dI.to(I.dtype), dT.to(grad_dtype or I.dtype), gs.sum()
