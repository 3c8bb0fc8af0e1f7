"""The untimed loss variants (loss_variants.py, panel.py) against the dense fp64 reference, end to
end through variant_clip_loss: loss and all three gradients. CPU: the interpreter; GPU: the
CUDA tests that the GPU script's pytest_new phase runs before any variant may become a default."""
import os
import threading

import pytest
import torch
import triton
import triton.language as tl

from kernels.test_contrastive import check
from kernels.tuning.loss_variants import as_tiles, half_softmax_sum, l2_bytes, variant_clip_loss
from kernels.tuning.panel import PanelConfig

CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
needs_interp = pytest.mark.skipif(not INTERP, reason="needs the Triton interpreter")
BWD = "32,32,64,64,4,1,1"  # FULL two-pass backward


def _trace(fn, *args, **kw):
    from kernels.tuning.compile_report import trace_launches

    return trace_launches(fn, *args, **kw)


@needs_interp
@pytest.mark.parametrize("matched", [0, 20])
def test_forward_factored_column_sums(matched):
    """FACTOR: random pairs keep every tile within the span guard; matched pairs at scale 100 put
    tiles outside it, which then take their own exponentials."""
    check("triton", 130, 64, torch.float32, True, 100.0, matched=matched, loss_fn=variant_clip_loss,
          fwd="32,32,64,64,4,1,1", bwd=BWD)


@needs_interp
@pytest.mark.parametrize("flag,matched", [(2, 0), (3, 20)])
def test_forward_one_row_block_per_program(flag, matched):
    """Flag bit 2: a program per row block (130 rows: 5 programs of 32), whose column partials are
    written once, never merged; with bit 1 as well, matched pairs take both FACTOR branches."""
    from kernels.tuning.loss_variants import triton_forward

    x, g = torch.randn(130, 64), torch.arange(130, dtype=torch.int32)
    (_, grid, _, meta), = _trace(triton_forward, x, x, torch.tensor([1.0]), g, g, False, tiles=f"32,32,64,64,4,1,{flag}")
    assert grid[0] == 5 and meta["ONE_RB"] and meta["FACTOR"] == bool(flag & 1)
    check("triton", 130, 64, torch.float32, True, 100.0, matched=matched, loss_fn=variant_clip_loss,
          fwd=f"32,32,64,64,4,1,{flag}", bwd=BWD)


@needs_interp
@pytest.mark.parametrize("flag,d,tma", [(4, 64, True), (6, 40, True), (7, 64, True), (4, 30, False)])
def test_forward_tma_descriptors(flag, d, tma):
    """Flag bit 4: operand blocks through tensor descriptors, which fill rows past b with zeros
    (130 rows: the last 32-row block is partial), alone, with a program per row block and with
    FACTOR. fp32 rows of 30 (120 bytes) are not 16-byte strided: pointer loads, same results."""
    from kernels.tuning.loss_variants import triton_forward

    x, g = torch.randn(130, d), torch.arange(130, dtype=torch.int32)
    tiles = f"32,32,32,64,4,1,{flag}"
    (_, _, _, meta), = _trace(triton_forward, x, x, torch.tensor([1.0]), g, g, False, tiles=tiles)
    assert meta["TMA"] is tma and meta["ONE_RB"] == bool(flag & 2)
    check("triton", 130, d, torch.float32, True, 100.0, matched=20 if flag & 1 else 0, loss_fn=variant_clip_loss,
          fwd=tiles, bwd=BWD)


@needs_interp
def test_register_cap_reaches_both_launches():
    """An eighth tile number caps the registers (maxnreg) of the forward and the two-pass backward;
    a compile option, so the same loss and gradients against fp64."""
    from kernels.tuning.loss_variants import triton_backward, triton_forward

    x, g, v = torch.randn(70, 64), torch.arange(70, dtype=torch.int32), torch.ones(70)
    tiles = "32,32,32,64,4,1,3,128"
    (_, _, _, fwd), = _trace(triton_forward, x, x, torch.tensor([1.0]), g, g, False, tiles=tiles)
    bwd = _trace(triton_backward, x, x, torch.tensor([1.0]), g, g, v, v, v, 1.0 / 70, False, tiles=tiles)
    assert fwd["maxnreg"] == 128 and len(bwd) == 2 and all(m["maxnreg"] == 128 for *_, m in bwd)
    assert as_tiles((32, 32, 32, 64, 4, 1, 3), 64)["maxnreg"] is None
    check("triton", 70, 64, torch.float32, True, 100.0, matched=20, loss_fn=variant_clip_loss, fwd=tiles, bwd=tiles)


@needs_interp
@pytest.mark.parametrize("flag,l1", [(8, True), (10, True), (12, False)])
def test_forward_l1_mark(flag, l1):
    """Flag bit 8 marks the forward's I loads .ca (l1_copies.py makes the GPU's copies allocate in
    L1), alone and with a program per row block; with TMA (bit 4) nothing is marked."""
    from kernels.tuning.loss_variants import triton_forward

    x, g = torch.randn(70, 64), torch.arange(70, dtype=torch.int32)
    tiles = f"32,32,32,64,4,1,{flag}"
    (_, _, _, meta), = _trace(triton_forward, x, x, torch.tensor([1.0]), g, g, False, tiles=tiles)
    assert meta["I_L1"] is l1 and meta["TMA"] is not l1
    check("triton", 70, 64, torch.float32, False, 10.0, loss_fn=variant_clip_loss, fwd=tiles, bwd=BWD)


@needs_interp
@pytest.mark.parametrize("tiles,d,tma", [("32,32,64,64,4,1,5", 200, True), ("64,32,64,64,4,1,5", 40, True),
                                         ("32,32,64,64,4,1,4", 200, False)])
def test_two_pass_backward_tma_descriptors(tiles, d, tma):
    """Bit 4 with FULL (bit 1): both backward passes load their whole-d tiles through tensor
    descriptors, zero-filled past d and past b; without FULL, d chunks keep pointer loads."""
    from kernels.tuning.loss_variants import triton_backward

    x, g, v = torch.randn(130, d), torch.arange(130, dtype=torch.int32), torch.ones(130)
    launches = _trace(triton_backward, x, x, torch.tensor([1.0]), g, g, v, v, v, 1.0, False, tiles=tiles)
    assert [meta["TMA"] for _, _, _, meta in launches] == [tma, tma]
    check("triton", 130, d, torch.float32, True, 20.0, loss_fn=variant_clip_loss, fwd="32,32,32,64,4,1", bwd=tiles)


def test_scratch_allocator_is_set_in_each_thread_and_keeps_a_users():
    """TMA descriptors need Triton's scratch allocator on GPU, kept in a ContextVar: each thread
    (autograd's backward thread too) must get one, and an allocator the user set stays."""
    from triton.runtime._allocation import NullAllocator, _allocator

    from kernels.tuning import loss_variants as lv

    seen = {}

    def user(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    def first():
        lv._scratch_allocator()

    def second():
        seen["before"] = _allocator.get()
        lv._scratch_allocator()
        seen["after"] = _allocator.get()
        triton.set_allocator(user)
        lv._scratch_allocator()
        seen["user"] = _allocator.get()

    for fn in (first, second):  # threads, so this process's own allocator is left as it was
        t = threading.Thread(target=fn)
        t.start()
        t.join()
    assert isinstance(seen["before"], NullAllocator) and seen["after"] is lv._torch_scratch and seen["user"] is user


@needs_interp
@pytest.mark.parametrize("b,d,grouped,scale,rows,mm", [(130, 300, True, 20.0, 64, "triton"),
                                                       (100, 40, False, 100.0, 0, "triton"),
                                                       (130, 300, False, 1.0, 32, "torch")])
def test_panel_backward(b, d, grouped, scale, rows, mm):
    """G through row panels: 64 or 32 rows give 3 and 5 panels (dT accumulated across them), 0
    one panel; the dI GEMM splits K in the interpreter; mm=torch does both GEMMs by torch.mm."""
    check("triton", b, d, torch.float32, grouped, scale, loss_fn=variant_clip_loss, fwd="32,32,32,64,4,1",
          backward="panel", panel=PanelConfig(rows=rows, mm=mm))


@needs_interp
def test_panel_matched_pairs_at_scale_100():
    """The panel's G tile takes one exponential where the span allows and two where matched pairs
    lift a tile's lse ~80 above the rest."""
    check("triton", 130, 64, torch.float32, False, 100.0, matched=20, loss_fn=variant_clip_loss,
          fwd="32,32,32,64,4,1", backward="panel", panel=PanelConfig(rows=64))


@needs_interp
@pytest.mark.parametrize("d,rows,cap", [(64, 64, ""), (40, 0, ",128")])
def test_panel_grad_tile_tma(d, rows, cap):
    """The G tile through tensor descriptors (its sixth number): 64-row panels of 130 rows, so a
    descriptor block reaches into the next panel's rows, which the tile must mask; and one panel
    whose last block runs past b, with its registers capped (a seventh number)."""
    from kernels.tuning.panel import panel_backward

    cfg = PanelConfig(grad=f"32,32,32,4,1,1{cap}", mm_tiles="32,32,32,4,1", rows=rows, mm="torch")
    x, g, v = torch.randn(130, d), torch.arange(130, dtype=torch.int32), torch.ones(130)
    launches = _trace(panel_backward, x, x, torch.tensor([1.0]), g, g, v, v, v, 1.0, False, config=cfg)
    assert launches[0][3]["TMA"] is True and launches[0][3]["maxnreg"] == (128 if cap else None)
    check("triton", 130, d, torch.float32, True, 20.0, loss_fn=variant_clip_loss, fwd="32,32,32,64,4,1",
          backward="panel", panel=cfg)


@needs_interp
def test_panel_backward_fp16():
    """fp16 G is stored scaled by 2^12 in the panel (its p ~ 1/b entries are subnormal otherwise)."""
    check("triton", 97, 64, torch.float16, True, 14.3, loss_fn=variant_clip_loss, fwd="32,32,32,64,4,1",
          backward="panel", panel=PanelConfig(rows=64))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the GPU script's pytest_new phase)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,d", [(1000, 40), (4097, 128), (2049, 300), (3000, 512)])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("fwd,bwd,backward", [("64,128,64,128,4,3,9", "64,64,64,512,8,2,1", "two_pass"),
                                              ("128,64,64,128,4,3,3", "64,64,64,512,8,2,1", "two_pass"),
                                              ("64,128,64,128,8,3,7,128", "64,64,64,512,8,2,5", "two_pass"),
                                              ("64,128,64,128,4,3", None, "panel")])
def test_cuda_variants_against_fp64(dtype, b, d, grouped, fwd, bwd, backward):
    """The variants the GPU sweep times, on the chip: FACTOR with L1 copies; a program per row
    block; FACTOR, one row block, TMA and a register cap with the TMA backward; the panel
    backward (TMA G tile). Tolerances as for the production kernels."""
    panel = PanelConfig(grad="128,64,64,8,3,1") if backward == "panel" else None
    check("triton", b, d, dtype, grouped, 100.0, device="cuda", tol=2e-3 if dtype == torch.float32 else None,
          tf32=dtype == torch.float32, loss_fn=variant_clip_loss, fwd=fwd, bwd=bwd, backward=backward, panel=panel)


@triton.jit
def _softmax_pair_kernel(S, LR, LC, OUT, M, N, BM: tl.constexpr, BN: tl.constexpr, TRANS: tl.constexpr,
                         SPAN: tl.constexpr):
    r = tl.arange(0, BM)
    c = tl.arange(0, BN)
    rmask, cmask = r < M, c < N
    lr = tl.load(LR + r, mask=rmask, other=0.0)
    lc = tl.load(LC + c, mask=cmask, other=0.0)
    if TRANS:
        off, m2 = c[:, None] * M + r[None, :], cmask[:, None] & rmask[None, :]
    else:
        off, m2 = r[:, None] * N + c[None, :], rmask[:, None] & cmask[None, :]
    p = half_softmax_sum(tl.load(S + off, mask=m2, other=0.0), lr, lc, rmask, cmask, TRANS, True, SPAN)
    tl.store(OUT + off, p, mask=m2)


def _softmax_pair_case(M, N, wide: bool):
    """A tile of S with its row and column lse. `wide` lifts a 3 x 3 block by 100, as three
    matched pairs do at logit scale 100: exp(S - lr) of a lifted row underflows where
    exp(S - lc) does not."""
    S = torch.randn(M, N, dtype=torch.float64) * 4
    if wide:
        S[:3, :3] += 100.0
    lr = torch.logsumexp(S, 1) + torch.rand(M, dtype=torch.float64)  # + the other tiles' share
    lc = torch.logsumexp(S, 0) + torch.rand(N, dtype=torch.float64)
    S, lr, lc = (x.float().double() for x in (S, lr, lc))  # the kernel's inputs, exactly
    ref = 0.5 * (torch.exp(S - lr[:, None]) + torch.exp(S - lc[None, :]))
    return S, lr, lc, ref


@needs_interp
@pytest.mark.parametrize("trans", [False, True])
def test_one_exponential_softmax_pair_and_its_guard(trans):
    """exp(S - lc) as exp(S - lr) times a row and a column factor: exact within the span guard;
    a wider tile takes two exponentials. Forcing the factored form on the wide tile (span 1e30)
    loses the underflowed entries: the guard matters, and the wide case took the other branch."""
    M, N = 29, 21
    for wide, span, ok in ((False, 50.0, True), (True, 50.0, True), (True, 1e30, False)):
        S, lr, lc, ref = _softmax_pair_case(M, N, wide)
        s32 = (S.T if trans else S).float().contiguous()
        out = torch.zeros_like(s32)
        _softmax_pair_kernel[(1,)](s32, lr.float(), lc.float(), out, M, N, BM=32, BN=32, TRANS=trans, SPAN=span)
        got = (out.T if trans else out).double()
        close = bool(torch.isfinite(got).all()) and torch.allclose(got, ref, rtol=1e-5, atol=1e-30)
        assert close is ok, (wide, span, (got - ref).abs().max())


def _tile_loads(b, d, BM, BN, BD, full, which):
    """The bytes an S-tile walk loads, counted by enumerating its tiles (the independent count
    that l2_bytes' closed form must equal): per tile, the operand rows it reads."""
    n_rb, n_cb = -(-b // BM), -(-b // BN)
    total = 0
    for _rb in range(n_rb):
        for _cb in range(n_cb):
            if which == "fwd":
                total += (BM + BN) * d
            elif not full:  # both passes, each d chunk: S's K loop over all d, then the chunk's operand
                total += 2 * (-(-d // BD)) * ((BM + BN) * d + (BN + BM) * BD // 2)
    if which == "bwd" and full:  # each program loads its own block's rows once and streams all of the other
        total = sum(min(BM, b - r0) + b for r0 in range(0, b, BM)) * d + sum(min(BN, b - c0) + b for c0 in range(0, b, BN)) * d
    return total * 2


def test_l2_bytes_count_what_each_tile_reloads():
    """l2_bytes' closed forms against a count made by walking the tiles, at a size small enough to
    enumerate (b = 1,000, not a tile multiple; d = 96)."""
    b, d = 1000, 96
    fwd = as_tiles((64, 128, 64, 128, 4, 3), d)
    assert l2_bytes(b, b, d, 2, fwd, "fwd") == _tile_loads(b, d, 64, 128, 128, False, "fwd")
    full = as_tiles((64, 64, 64, 512, 8, 2, 1), d)
    assert full["FULL"] and l2_bytes(b, b, d, 2, full, "bwd") == _tile_loads(b, d, 64, 64, 128, True, "bwd")
    chunked = as_tiles((64, 64, 64, 32, 8, 3), d)
    assert not chunked["FULL"] and l2_bytes(b, b, d, 2, chunked, "bwd") == _tile_loads(b, d, 64, 64, 32, False, "bwd")
