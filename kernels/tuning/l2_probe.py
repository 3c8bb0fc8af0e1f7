"""A probe of the L2 read ceiling: the convolutions' implicit GEMMs re-read each activation once
per kernel tap and each weight tile once per M tile, through L2 (their 16-byte async copies
bypass L1), so at layer1 a forward moves about 18 GB through L2 for 0.45 GB of activations. The
matmul and copy ceilings do not bound that; this one does, measured in the same run.

    l2_read(x, reads) -> per-program sums   # every program reads `reads` blocks of x, L1 bypassed
    l2_read_reference(x, reads, programs)   # the same sums in torch

Each program reads blocks (pid + j * programs) mod n_blocks for j < reads, so consecutive reads of
one program are far apart (no L1 reuse even if it cached), and x (a few MB) stays in L2."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per read: 8 KB of bf16 per program and step


@triton.jit
def _l2_read(X, OUT, n_blocks, reads, programs, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), tl.float32)
    offs = tl.arange(0, BLOCK)
    for j in range(reads):
        blk = (pid + j * programs) % n_blocks
        acc += tl.load(X + blk * BLOCK + offs, cache_modifier=".cg").to(tl.float32)
    tl.store(OUT + pid, tl.sum(acc))


def l2_read(x: torch.Tensor, reads: int, programs: int) -> torch.Tensor:
    """[programs] fp32 sums; reads * programs * BLOCK * x.element_size() bytes come through L2."""
    if x.dim() != 1 or x.numel() % BLOCK:
        raise ValueError(f"l2_read: x must be 1-D with a multiple of {BLOCK} elements, got {tuple(x.shape)}")
    out = torch.empty(programs, device=x.device, dtype=torch.float32)
    _l2_read[(programs,)](x, out, x.numel() // BLOCK, reads, programs, BLOCK=BLOCK, num_warps=4)
    return out


def l2_read_reference(x: torch.Tensor, reads: int, programs: int) -> torch.Tensor:
    blocks = x.double().reshape(-1, BLOCK).sum(1)
    j = torch.arange(reads, device=x.device)
    idx = (torch.arange(programs, device=x.device)[:, None] + j[None, :] * programs) % blocks.numel()
    return blocks[idx].sum(1)


def l2_read_GBps(mb: int = 16, reads: int = 256) -> float:
    """The L2 read rate on the current GPU: an `mb` MB buffer (well inside H100's 50 MB L2) read
    by 8 programs per SM, CUDA events, median of 10."""
    from kernels.device import num_sms

    x = torch.randn(mb * 2 ** 20 // 2, device="cuda", dtype=torch.bfloat16)
    programs = 8 * num_sms(x.device)
    l2_read(x, reads, programs)  # compile, and bring x into L2
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        l2_read(x, reads, programs)
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    return reads * programs * BLOCK * x.element_size() / sorted(ts)[len(ts) // 2] / 1e9
