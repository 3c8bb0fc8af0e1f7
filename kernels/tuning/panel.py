"""Panel backward of the blockwise InfoNCE: S is recomputed once (8 b^2 d in all, not 10), and
dI, dT come from plain GEMMs with large tiles instead of d-wide register accumulators.

Why: at d = 512 the two-pass kernels keep a [64, 512] fp32 gradient accumulator per program (the
register limit), which pins their tiles at 64 x 64 and leaves the MMA and the exponentials in
series; they ran at 25% of the bf16 matmul rate (benchmarks/README.md). Here the rows are taken
in panels of R rows:

    G[r0:r0+R, :] = dLoss/dS on those rows   (_grad_tile: GEMM tile for S + G in the epilogue)
    dI[r0:r0+R]   = s coef G_p T             (_mm, K = b_c)
    dT           += s coef G_p^T I_p         (_mm, K = R, accumulated in fp32 in place)

The panel is the only large buffer: R x b_c in the operand dtype, R chosen so that it stays
under PANEL_BYTES; it is O(b), never b x b. dT is kept in fp32 across panels (panel partial sums
of p - t cancel; rounding each one to bf16 would cost the result its precision). Every
reduction has a fixed order, so the result is deterministic. `mm="torch"` does the two GEMMs
with torch.mm (cuBLAS on GPU) for comparison in the benchmark. Untimed on a GPU: tuning only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import contrastive_triton as ct
from kernels.contrastive_triton import INTERPRET
from kernels.device import num_sms

from .loss_variants import descriptors, variant_g_tile, variant_s_tile, tma_ok

PANEL_BYTES = 512 << 20


@triton.jit
def _grad_tile(I, T, G_R, G_C, LSE_R, LSE_C, NPOS, GP, GS, scale_ptr, r0, R, B_R, B_C, D, sI, sT, sGP,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, GSCALE: tl.constexpr,
               TMA: tl.constexpr = False):
    """One [BM, BN] tile of G for panel rows [r0, r0 + R): S over a pipelined K loop, G from both
    directions in the epilogue, stored scaled (GSCALE) in the panel's dtype; the tile's
    sum(G * S) goes to its own slot of GS (d logit_scale, summed later in a fixed order).
    TMA: operands through tensor descriptors (variant_s_tile)."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    s = tl.load(scale_ptr).to(tl.float32)
    lrows = pm * BM + tl.arange(0, BM)
    rows = r0 + lrows
    rmask = (lrows < R) & (rows < B_R)
    cols = pn * BN + tl.arange(0, BN)
    cmask = cols < B_C
    if TMA:
        I, T = descriptors(I, T, B_R, B_C, D, sI, sT, BM, BN, BK)
    S = variant_s_tile(I, T, rows, cols, rmask, cmask, s, D, sI, sT, BM, BN, BK, PREC, r0 + pm * BM, pn * BN, TMA)
    G = variant_g_tile(S, rows, cols, rmask, cmask, LSE_R, LSE_C, NPOS, G_R, G_C, FACTOR=True)
    tl.store(GS + pm * tl.num_programs(1) + pn, tl.sum(tl.sum(G * S, 1), 0))
    tl.store(GP + lrows[:, None] * sGP + cols[None, :], (G * GSCALE).to(GP.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _mm(A, B, C, scale_ptr, coef_ptr, M, N, K, K_PER, sAm, sAk, sBk, sBn, sCm, sCs,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, ACC: tl.constexpr,
        PREC: tl.constexpr, GSCALE: tl.constexpr):
    """C (+)= s coef / GSCALE * A @ B on one [BM, BN] tile over the K range of split slot
    program_id(1) (slot stride sCs). Tiles are visited GROUP_M row tiles at a time, so that a
    column panel of B is reused from L2. ACC adds into C (fp32) in place."""
    pid = tl.program_id(0)
    ks = tl.program_id(1)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    group = tl.minimum(n_m - first_m, GROUP_M)
    pm = first_m + (pid % width) % group
    pn = (pid % width) // group
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    k_lo = ks * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < k_hi
        a = tl.load(A + rm[:, None] * sAm + kk[None, :] * sAk, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(B + kk[:, None] * sBk + rn[None, :] * sBn, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    alpha = tl.load(scale_ptr).to(tl.float32) * tl.load(coef_ptr).to(tl.float32) / GSCALE
    out = acc * alpha
    ptr = C + ks * sCs + rm[:, None] * sCm + rn[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if ACC:
        out += tl.load(ptr, mask=omask, other=0.0)
    tl.store(ptr, out.to(C.dtype.element_ty), mask=omask)


# ---- launch ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PanelConfig:
    """The panel backward's launch: G tile "BM,BN,BK,warps,stages[,tma[,maxnreg]]" (tma=1: its
    operands through tensor descriptors where the inputs allow; maxnreg caps its registers), the
    GEMMs' "BM,BN,BK,warps,stages" (None: the defaults below), rows per panel (0: as many as
    PANEL_BYTES allows) and the GEMM backend (triton, or torch: cuBLAS on GPU)."""
    grad: Optional[str] = None
    mm_tiles: Optional[str] = None
    rows: int = 0
    mm: str = "triton"

    @staticmethod
    def parse(spec: str, rows: int = 0, mm: str = "triton") -> "PanelConfig":
        """"G;MM" as the GPU script writes a sweep entry."""
        g, _, m = spec.partition(";")
        return PanelConfig(g or None, m or None, rows, mm)


def panel_tiles(dtype: torch.dtype, config: PanelConfig = PanelConfig()) -> dict:
    """(BM, BN, BK, warps, stages) of the G tile and of the GEMMs. The GPU defaults compile (sm_90a,
    bf16, d = 512) to at most 118 registers and 96 KB of shared memory, so that two programs share
    an SM and one's epilogue (the exponentials) overlaps the other's MMA; a 128 x 128 G tile
    needs 227 registers. Unmeasured until a GPU run; the benchmark sweeps others."""
    if INTERPRET:
        g = m = [32, 32, 32, 4, 1]
    elif dtype in (torch.float16, torch.bfloat16):  # each fits twice per SM (registers, shared memory)
        g, m = [128, 64, 64, 8, 3], [128, 128, 64, 8, 3]
    else:
        g, m = [64, 64, 32, 4, 3], [64, 64, 32, 4, 3]
    if config.grad:
        g = [int(x) for x in config.grad.split(",")]
    if config.mm_tiles:
        m = [int(x) for x in config.mm_tiles.split(",")]
    keys = ("BM", "BN", "BK", "num_warps", "num_stages")
    grad = dict(zip(keys, g), TMA=len(g) > 5 and bool(g[5]), maxnreg=(g[6] or None) if len(g) > 6 else None)
    return {"grad": grad, "mm": dict(zip(keys, m))}


def panel_rows(b_r: int, b_c: int, itemsize: int, bm: int, rows: int = 0) -> int:
    """Rows per panel: the [R, b_c] panel stays under PANEL_BYTES (or `rows`, for tests and the
    sweep), R a multiple of the G tile's rows."""
    want = rows or PANEL_BYTES // max(1, b_c * itemsize)
    return min(triton.cdiv(b_r, bm) * bm, max(bm, want // bm * bm))


def _split_k(programs: int, K: int, bk: int, device) -> int:
    """K splits for a GEMM whose output tiles alone would leave SMs idle (dI of a short panel).
    The interpreter splits in two whenever it can, so that the partial sums are exercised."""
    if INTERPRET:
        return 2 if K > 2 * bk else 1
    return max(1, min(triton.cdiv(2 * num_sms(device), programs), K // (4 * bk)))


def _mm_triton(A, B, C, s, coef_t, acc: bool, prec: str, gscale: float, t: dict):
    """C (+)= s coef / gscale * A @ B; split-K partials are summed in fp32, in slot order."""
    M, K = A.shape
    N = B.shape[1]
    tiles = triton.cdiv(M, t["BM"]) * triton.cdiv(N, t["BN"])
    split = _split_k(tiles, K, t["BK"], A.device)
    k_per = triton.cdiv(triton.cdiv(K, split), t["BK"]) * t["BK"]
    split = triton.cdiv(K, k_per)
    out = C if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=A.device)
    _mm[(tiles, split)](A, B, out, s, coef_t, M, N, K, k_per, A.stride(0), A.stride(1), B.stride(0), B.stride(1),
                        out.stride(-2), out.stride(0) if split > 1 else 0, GROUP_M=8, ACC=acc and split == 1, PREC=prec,
                        GSCALE=gscale, **t)
    if split > 1:
        C.add_(out.sum(0)) if acc else C.copy_(out.sum(0))


def _mm_torch(A, B, C, s, coef_t, acc: bool, prec: str, gscale: float, t: dict):
    """The same GEMM by torch.mm (cuBLAS on GPU): fp32 output from 16-bit operands."""
    if A.is_cuda and A.dtype != torch.float32:
        prod = torch.mm(A, B, out_dtype=torch.float32)
    else:
        prod = torch.mm(A.float(), B.float())
    prod.mul_(s * coef_t / gscale)
    C.add_(prod) if acc else C.copy_(prod)


def panel_backward(I, T, s, g_rows, g_cols, lse_r, lse_c, n_rows, coef, tf32: bool = True, grad_dtype=None,
                   config: Optional[PanelConfig] = None):
    """dI [b_r, d] (input dtype), dT [b_c, d] (grad_dtype, default the input dtype) and
    d logit_scale (0-d fp32) of the summed loss times `coef`, as triton_backward returns them."""
    b_r, D = I.shape
    b_c = T.shape[0]
    config = config or PanelConfig()
    if config.mm not in ("triton", "torch"):
        raise ValueError(f"the panel's GEMM backend must be triton or torch, got {config.mm!r}")
    gemm = _mm_triton if config.mm == "triton" else _mm_torch
    tiles = panel_tiles(I.dtype, config)
    tg = dict(tiles["grad"], TMA=tiles["grad"]["TMA"] and tma_ok(I, T))
    prec, gscale = ct.prec(I.dtype, tf32), ct.gscale(I.dtype)
    coef_t = torch.as_tensor(coef, dtype=torch.float32, device=I.device).reshape(1)
    R = panel_rows(b_r, b_c, I.dtype.itemsize, tg["BM"], config.rows)
    panel = torch.empty((R, b_c), dtype=I.dtype, device=I.device)
    dI = torch.empty((b_r, D), dtype=I.dtype, device=I.device)
    dT = torch.empty((b_c, D), dtype=torch.float32, device=I.device)
    n_pn = triton.cdiv(b_c, tg["BN"])
    gs = torch.empty(triton.cdiv(R, tg["BM"]) * n_pn * triton.cdiv(b_r, R), dtype=torch.float32, device=I.device)
    at = 0
    for p, r0 in enumerate(range(0, b_r, R)):
        rp = min(R, b_r - r0)
        grid = (triton.cdiv(rp, tg["BM"]), n_pn)
        _grad_tile[grid](I, T, g_rows, g_cols, lse_r, lse_c, n_rows, panel, gs[at:], s, r0, rp, b_r, b_c, D,
                         I.stride(0), T.stride(0), panel.stride(0), PREC=prec, GSCALE=gscale, **tg)
        at += grid[0] * grid[1]
        gp = panel[:rp]
        gemm(gp, T, dI[r0:r0 + rp], s, coef_t, False, prec, gscale, tiles["mm"])
        gemm(gp.t(), I[r0:r0 + rp], dT, s, coef_t, p > 0, prec, gscale, tiles["mm"])
    return dI, dT.to(grad_dtype or I.dtype), gs[:at].sum() * (coef_t[0] / s[0])
