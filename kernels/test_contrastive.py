"""Blockwise CLIP loss vs the dense fp64 reference: loss and all three gradients, fresh random
inputs every run. CPU: Triton kernels in the interpreter and the chunked torch path. GPU:
the compiled kernels, bf16 included (the interpreter gets bf16 dots wrong)."""
import os

import pytest
import torch
import triton
import triton.language as tl

from kernels.contrastive import blockwise_clip_loss, reference_clip_loss
from kernels.contrastive_triton import _half_softmax_sum

CUDA = torch.cuda.is_available()
CPU_IMPLS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
# ||out - ref|| / ||ref|| bounds (METHOD.md): fp32 far under 1e-3, tf32 ~3e-4, fp16/bf16 1e-3..1e-2.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _case(b, d, dtype, grouped, scale, device, normalise=True, matched=0):
    """`matched` leading pairs are near-copies (cosine ~0.99), as a trained model's are: at scale
    100 their lse sit ~80 above the others', the wide-span case of the one-exponential softmax."""
    I = torch.randn(b, d, dtype=torch.float64, device=device)
    T = torch.randn(b, d, dtype=torch.float64, device=device)
    T[:matched] = I[:matched] + 0.1 * T[:matched] / d ** 0.5
    if normalise:
        I, T = I / I.norm(dim=1, keepdim=True), T / T.norm(dim=1, keepdim=True)
    g = torch.randint(0, max(2, b // 8), (b,), device=device) if grouped else None
    s = torch.tensor(float(scale), dtype=torch.float64, device=device)
    return I, T, s, g


def _check(impl, b, d, dtype, grouped, scale, device="cpu", tol=None, tf32=False, matched=0, backward=None):
    I, T, s, g = _case(b, d, dtype, grouped, scale, device, matched=matched)
    # the reference sees exactly the rounded inputs the kernel sees
    I, T = I.to(dtype).double(), T.to(dtype).double()
    Ir, Tr, sr = (x.clone().requires_grad_() for x in (I, T, s))
    ref = reference_clip_loss(Ir, Tr, sr, group_ids=g)
    ref.backward()
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    Ik, Tk = I.to(dtype).requires_grad_(), T.to(dtype).requires_grad_()
    sk = s.to(sdt).requires_grad_()
    out = blockwise_clip_loss(Ik, Tk, sk, group_ids=g, impl=impl, tf32=tf32, backward=backward)
    out.backward()
    tol = tol or TOL[dtype]
    for name, a, r in [("loss", out, ref), ("dI", Ik.grad, Ir.grad), ("dT", Tk.grad, Tr.grad), ("dscale", sk.grad, sr.grad)]:
        assert torch.isfinite(a).all(), name
        err = float((a.detach().double() - r.detach()).norm() / r.detach().norm().clamp_min(1e-30))
        assert err < tol, f"{impl} {dtype} b={b} d={d} groups={grouped} scale={scale}: {name} rel err {err:.2e}"


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("b,d", [(100, 40), (77, 128), (130, 300)])  # b never a tile multiple; d not a power of 2
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_cpu_fp32_against_fp64(impl, b, d, grouped, scale):
    _check(impl, b, d, torch.float32, grouped, scale)


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("tiles,d,full", [("32,32,32,64,4,1,0", 300, False), ("32,32,64,64,4,1,1", 200, True),
                                          ("64,32,32,64,4,1,0", 300, False), ("32,64,64,64,4,1,1", 200, True)])
def test_tile_variants(monkeypatch, tiles, d, full):
    """Chunked d (BD=64 < d: S recomputed per chunk) and FULL (one d chunk, no K loop; fp32 rows
    up to 256 wide); 32-row tiles give 5 row and column blocks, so the strided programs and both
    splits are exercised. BM != BN: the column pass works on S^T, so a swapped tile side shows.
    The flag also turns on the forward's FACTOR column sums."""
    from kernels.contrastive_triton import pick_tiles

    monkeypatch.setenv("CTVLP_CLIP_TILES", tiles)
    assert pick_tiles(d, torch.float32, "bwd")["FULL"] is full
    _check("triton", 130, d, torch.float32, True, 20.0)


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("b,d,grouped", [(100, 40, False), (130, 300, True)])
def test_fused_backward_variant(monkeypatch, b, d, grouped):
    monkeypatch.setenv("CTVLP_CLIP_BACKWARD", "fused")
    _check("triton", b, d, torch.float32, grouped, 30.0)


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("b,d,grouped,scale,rows,mm", [(130, 300, True, 20.0, 64, "triton"), (100, 40, False, 100.0, 0, "triton"),
                                                       (130, 300, False, 1.0, 32, "torch")])
def test_panel_backward_variant(monkeypatch, b, d, grouped, scale, rows, mm):
    """G through row panels: 64 or 32 rows give 3 and 5 panels (dT accumulated across them), 0
    one panel; the dI GEMM splits K in the interpreter; mm=torch does both GEMMs by torch.mm."""
    monkeypatch.setenv("CTVLP_CLIP_BACKWARD", "panel")
    monkeypatch.setenv("CTVLP_CLIP_PANEL_ROWS", str(rows))
    monkeypatch.setenv("CTVLP_CLIP_PANEL_MM", mm)
    _check("triton", b, d, torch.float32, grouped, scale)


@pytest.mark.parametrize("impl,backward", [("torch", None)] + [("triton", v) for v in ("two_pass", "panel")
                                                                 if "triton" in CPU_IMPLS])
def test_matched_pairs_at_scale_100(impl, backward):
    """A trained model's batch: 20 matched pairs among unmatched ones, scale 100; tiles mixing
    both take the two-exponential branch, the others the factored one. The variant is chosen by
    the `backward` argument here (by CTVLP_CLIP_BACKWARD elsewhere)."""
    _check(impl, 130, 64, torch.float32, False, 100.0, matched=20, backward=backward)


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("matched", [0, 20])
def test_forward_factored_column_sums(monkeypatch, matched):
    """The forward's FACTOR column sums: random pairs keep every tile within the span guard;
    matched pairs at scale 100 put tiles outside it, which then take their own exponentials."""
    monkeypatch.setenv("CTVLP_CLIP_TILES", "32,32,64,64,4,1,1")
    _check("triton", 130, 64, torch.float32, True, 100.0, matched=matched)


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("flag,matched", [(2, 0), (3, 20)])
def test_forward_one_row_block_per_program(monkeypatch, flag, matched):
    """Flag bit 2: a program per row block (130 rows: 5 programs of 32), whose column partials are
    written once, never merged; on GPU its column and K loops become one pipelined loop. With
    bit 1 as well, the FACTOR column sums, matched pairs taking both branches."""
    from kernels.compile_report import trace_launches
    from kernels.contrastive_triton import pick_tiles, triton_forward

    monkeypatch.setenv("CTVLP_CLIP_TILES", f"32,32,64,64,4,1,{flag}")
    x, g = torch.randn(130, 64), torch.arange(130, dtype=torch.int32)
    (_, grid, _, meta), = trace_launches(triton_forward, x, x, torch.tensor([1.0]), g, g, False,
                                         tiles=pick_tiles(64, x.dtype))
    assert grid[0] == 5 and meta["ONE_RB"] and meta["FACTOR"] == bool(flag & 1)
    _check("triton", 130, 64, torch.float32, True, 100.0, matched=matched)


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("flag,d,tma", [(4, 64, True), (6, 40, True), (7, 64, True), (4, 30, False)])
def test_forward_tma_descriptors(monkeypatch, flag, d, tma):
    """Flag bit 4: the forward loads its operand blocks through tensor descriptors, which fill
    rows past b with zeros (130 rows: the last 32-row block is partial), alone, with a program
    per row block and with FACTOR. fp32 rows of 30 (120 bytes) are not 16-byte strided, so the
    copy engine cannot take them: those inputs keep pointer loads, with the same results."""
    from kernels.compile_report import trace_launches
    from kernels.contrastive_triton import pick_tiles, triton_forward

    monkeypatch.setenv("CTVLP_CLIP_TILES", f"32,32,32,64,4,1,{flag}")
    x, g = torch.randn(130, d), torch.arange(130, dtype=torch.int32)
    (_, _, _, meta), = trace_launches(triton_forward, x, x, torch.tensor([1.0]), g, g, False,
                                      tiles=pick_tiles(d, x.dtype))
    assert meta["TMA"] is tma and meta["ONE_RB"] == bool(flag & 2)
    _check("triton", 130, d, torch.float32, True, 100.0, matched=20 if flag & 1 else 0)


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
def test_register_cap_reaches_both_launches(monkeypatch):
    """An eighth tile number is a register cap (ptxas's maxnreg) for the forward and the two-pass
    backward; a compile option, so the same loss and gradients against fp64 (its effect on the
    machine code is in test_compile_report.py)."""
    from kernels.compile_report import trace_launches
    from kernels.contrastive_triton import pick_tiles, triton_backward, triton_forward

    monkeypatch.setenv("CTVLP_CLIP_TILES", "32,32,32,64,4,1,3,128")
    x, g, v = torch.randn(70, 64), torch.arange(70, dtype=torch.int32), torch.ones(70)
    (_, _, _, fwd), = trace_launches(triton_forward, x, x, torch.tensor([1.0]), g, g, False,
                                     tiles=pick_tiles(64, x.dtype))
    bwd = trace_launches(triton_backward, x, x, torch.tensor([1.0]), g, g, v, v, v, 1.0 / 70, False,
                         tiles=pick_tiles(64, x.dtype, "bwd"))
    assert fwd["maxnreg"] == 128 and len(bwd) == 2 and all(m["maxnreg"] == 128 for *_, m in bwd)
    monkeypatch.setenv("CTVLP_CLIP_TILES", "32,32,32,64,4,1,3")
    assert pick_tiles(64, x.dtype)["maxnreg"] is None
    monkeypatch.setenv("CTVLP_CLIP_TILES", "32,32,32,64,4,1,3,128")
    _check("triton", 70, 64, torch.float32, True, 100.0, matched=20)


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("flag,l1", [(8, True), (10, True), (12, False)])
def test_forward_l1_mark(monkeypatch, flag, l1):
    """Flag bit 8: the forward marks its I loads .ca (l1_copies.py makes the GPU's copies allocate
    in L1), alone and with a program per row block; with TMA (bit 4) nothing is marked, since the
    copy engine's loads skip L1. The same loss and gradients against fp64."""
    from kernels.compile_report import trace_launches
    from kernels.contrastive_triton import pick_tiles, triton_forward

    monkeypatch.setenv("CTVLP_CLIP_TILES", f"32,32,32,64,4,1,{flag}")
    x, g = torch.randn(70, 64), torch.arange(70, dtype=torch.int32)
    (_, _, _, meta), = trace_launches(triton_forward, x, x, torch.tensor([1.0]), g, g, False,
                                      tiles=pick_tiles(64, x.dtype))
    assert meta["I_L1"] is l1 and meta["TMA"] is not l1
    _check("triton", 70, 64, torch.float32, False, 10.0)


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("tiles,d,tma", [("32,32,64,64,4,1,5", 200, True), ("64,32,64,64,4,1,5", 40, True),
                                         ("32,32,64,64,4,1,4", 200, False)])
def test_two_pass_backward_tma_descriptors(monkeypatch, tiles, d, tma):
    """Bit 4 with FULL (bit 1): both backward passes load their whole-d tiles through tensor
    descriptors, zero-filled past d (d = 200 in 256-wide tiles) and past b (130 rows); BM != BN
    shows a swapped block shape. Without FULL the tiles are d chunks, which keep pointer loads."""
    from kernels.compile_report import trace_launches
    from kernels.contrastive_triton import pick_tiles, triton_backward

    monkeypatch.setenv("CTVLP_CLIP_TILES", tiles)
    x, g, v = torch.randn(130, d), torch.arange(130, dtype=torch.int32), torch.ones(130)
    launches = trace_launches(triton_backward, x, x, torch.tensor([1.0]), g, g, v, v, v, 1.0, False,
                              tiles=pick_tiles(d, x.dtype, "bwd"))
    assert [meta["TMA"] for _, _, _, meta in launches] == [tma, tma]
    _check("triton", 130, d, torch.float32, True, 20.0)


def test_scratch_allocator_is_set_in_each_thread_and_keeps_a_users():
    """The TMA kernels' descriptors need Triton's scratch allocator on GPU. Triton keeps it in a
    ContextVar, so every thread starts without one, autograd's backward thread on GPU too: after
    one thread has set it, another must still get it, and an allocator the user set stays."""
    import threading

    from triton.runtime._allocation import NullAllocator, _allocator

    from kernels import contrastive_triton as ct

    seen = {}

    def user(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    def first():
        ct._scratch_allocator()

    def second():
        seen["before"] = _allocator.get()
        ct._scratch_allocator()
        seen["after"] = _allocator.get()
        triton.set_allocator(user)
        ct._scratch_allocator()
        seen["user"] = _allocator.get()

    for fn in (first, second):  # threads, so this process's own allocator is left as it was
        t = threading.Thread(target=fn)
        t.start()
        t.join()
    assert isinstance(seen["before"], NullAllocator) and seen["after"] is ct._torch_scratch and seen["user"] is user


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("d,rows,cap", [(64, 64, ""), (40, 0, ",128")])
def test_panel_grad_tile_tma(monkeypatch, d, rows, cap):
    """The panel's G tile through tensor descriptors (the sixth G-tile number): 64-row panels of
    130 rows, so a descriptor block reaches past a panel's last row into the next panel's rows,
    which the tile must mask, not use; and one panel whose last block runs past b, there with
    its registers capped (a seventh number, a compile option: the same results)."""
    from kernels.compile_report import trace_launches
    from kernels.contrastive_panel import panel_backward

    monkeypatch.setenv("CTVLP_CLIP_BACKWARD", "panel")
    monkeypatch.setenv("CTVLP_CLIP_PANEL_ROWS", str(rows))
    monkeypatch.setenv("CTVLP_CLIP_PANEL_TILES", f"32,32,32,4,1,1{cap};32,32,32,4,1")
    x, g, v = torch.randn(130, d), torch.arange(130, dtype=torch.int32), torch.ones(130)
    launches = trace_launches(panel_backward, x, x, torch.tensor([1.0]), g, g, v, v, v, 1.0, False, mm="torch")
    assert launches[0][3]["TMA"] is True and launches[0][3]["maxnreg"] == (128 if cap else None)
    _check("triton", 130, d, torch.float32, True, 20.0)


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
def test_backward_variants_agree_on_rectangular_blocks():
    """The distributed path's shape: a rank's b_r rows against all b_c columns, dT in fp32. The
    three variants must give the same gradients (two_pass is checked against fp64 above)."""
    from kernels.contrastive_ref import merge_column_stats
    from kernels.contrastive_triton import triton_backward, triton_forward

    b_r, b_c, d = 45, 130, 72
    I, T = torch.randn(b_r, d), torch.randn(b_c, d)
    I, T = I / I.norm(dim=1, keepdim=True), T / T.norm(dim=1, keepdim=True)
    s = torch.tensor([30.0])
    g_c = torch.randint(0, 20, (b_c,), dtype=torch.int32)
    g_r = g_c[40:40 + b_r].contiguous()
    lse_r, cmax, csum, _ = triton_forward(I, T, s, g_r, g_c, False)
    lse_c = merge_column_stats(cmax, csum)
    n_rows = (g_r[:, None] == g_c[None, :]).sum(1).float()
    out = {v: triton_backward(I, T, s, g_r, g_c, lse_r, lse_c, n_rows, 1.0 / b_c, False, grad_dtype=torch.float32,
                              variant=v) for v in ("two_pass", "fused", "panel")}
    for v in ("fused", "panel"):
        for a, r in zip(out[v], out["two_pass"]):
            assert a.dtype == r.dtype and torch.allclose(a, r, rtol=1e-4, atol=1e-6), v


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_cpu_fp16(impl):
    _check(impl, 97, 64, torch.float16, True, 14.3)


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
def test_panel_backward_fp16(monkeypatch):
    """fp16 G is stored scaled by 2^12 in the panel (its p ~ 1/b entries are subnormal otherwise)."""
    monkeypatch.setenv("CTVLP_CLIP_BACKWARD", "panel")
    monkeypatch.setenv("CTVLP_CLIP_PANEL_ROWS", "64")
    _check("triton", 97, 64, torch.float16, True, 14.3)


def test_chunked_fp64_is_exact():
    _check("torch", 300, 40, torch.float64, True, 50.0)


def test_group_ids_without_structure_equal_the_diagonal():
    I, T, s, _ = _case(64, 32, torch.float64, False, 10.0, "cpu")
    a = blockwise_clip_loss(I, T, s, impl="torch")
    b = blockwise_clip_loss(I, T, s, group_ids=torch.arange(64) * 7 + 3, impl="torch")
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_sum_reduction_and_python_scale():
    I, T, s, g = _case(50, 24, torch.float64, True, 3.0, "cpu")
    a = blockwise_clip_loss(I, T, 3.0, group_ids=g, reduction="sum", impl="torch")
    assert torch.allclose(a, reference_clip_loss(I, T, s, group_ids=g, reduction="sum"), rtol=1e-12)


def test_chunked_path_never_allocates_b_by_b(monkeypatch):
    """Every intermediate of the chunked path is at most chunk x b."""

    b, biggest = 1500, [0]

    def spying(orig):
        def spy(*args, **kw):
            out = orig(*args, **kw)
            biggest[0] = max(biggest[0], out.numel())
            return out
        return spy

    monkeypatch.setattr(torch.Tensor, "__matmul__", spying(torch.Tensor.__matmul__))
    monkeypatch.setattr(torch, "mm", spying(torch.mm))
    I, T, s, g = _case(b, 16, torch.float32, True, 10.0, "cpu")
    I.requires_grad_()
    blockwise_clip_loss(I, T.float(), s.float(), group_ids=g, impl="torch").backward()
    assert 0 < biggest[0] <= 64 * b < b * b


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (runs on the lent GPU machine)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,d", [(1000, 40), (4097, 128), (2049, 300), (3000, 512)])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("backward", ["two_pass", "fused", "panel"])
def test_cuda_triton_against_fp64(dtype, b, d, grouped, scale, backward, monkeypatch):
    """fp32 goes through tf32 (10-bit mantissa, ~3e-4 per logit); the gradient's p - t cancels
    much of p, which multiplies that relative error, hence 2e-3 on the gradients."""
    monkeypatch.setenv("CTVLP_CLIP_BACKWARD", backward)
    _check("triton", b, d, dtype, grouped, scale, device="cuda", tol=2e-3 if dtype == torch.float32 else None,
           tf32=dtype == torch.float32)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (runs on the lent GPU machine)")
@pytest.mark.parametrize("b,d,grouped", [(1000, 40, False), (2049, 300, True)])
def test_cuda_fp32_without_tf32(b, d, grouped):
    _check("triton", b, d, torch.float32, grouped, 30.0, device="cuda", tol=1e-4, tf32=False)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="exercises the tuner's mechanics in the interpreter")
def test_autotuner_picks_a_compiling_candidate_and_caches_it():
    """Mechanics only (interpreter timings mean nothing): a candidate that cannot compile is
    skipped, the fastest of the rest is cached per (d, dtype, device), and its results are right."""
    from kernels import contrastive_triton as ct

    I, T, s, g = _case(70, 40, torch.float32, True, 10.0, "cpu")
    I, T, s = I.float(), T.float(), s.float().reshape(1)
    g = g.to(torch.int32)
    times = iter([5.0, 2.0])
    bad = (64, 64, 12, 64, 4, 1)  # BK=12: tl.dot needs >= 16, does not compile
    ct._TUNED.clear()
    best = ct.autotune(I, T, s, g, g, False, candidates=[bad, (64, 64, 32, 64, 4, 1), (32, 32, 64, 64, 4, 1)],
                       probe_rows=100, time_fn=lambda fn: (fn(), next(times))[1])
    assert (best["BM"], best["BK"]) == (32, 64)
    assert ct.autotune(I, T, s, g, g, False, candidates=[]) is best  # cached
    lse_r, cmax, csum, pos = ct.triton_forward(I, T, s, g, g, False, tiles=best)
    ref = torch.logsumexp(s * I.double() @ T.double().T, 1)
    assert torch.allclose(lse_r.double(), ref, atol=1e-5)
    ct._TUNED.clear()


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
    p = _half_softmax_sum(tl.load(S + off, mask=m2, other=0.0), lr, lc, rmask, cmask, TRANS, True, SPAN)
    tl.store(OUT + off, p, mask=m2)


def _softmax_pair_case(M, N, wide: bool):
    """A tile of S (fp32 values) with its row and column lse. `wide` lifts a 3 x 3 block by 100,
    as three matched pairs do at logit scale 100: their rows' and columns' lse sit 100 above the
    rest, and exp(S - lr) of a lifted row underflows (even without flushing subnormals, as the
    interpreter does not) where exp(S - lc) does not."""
    S = torch.randn(M, N, dtype=torch.float64) * 4
    if wide:
        S[:3, :3] += 100.0
    lr = torch.logsumexp(S, 1) + torch.rand(M, dtype=torch.float64)  # + the other tiles' share
    lc = torch.logsumexp(S, 0) + torch.rand(N, dtype=torch.float64)
    S, lr, lc = (x.float().double() for x in (S, lr, lc))  # the kernel's inputs, exactly
    ref = 0.5 * (torch.exp(S - lr[:, None]) + torch.exp(S - lc[None, :]))
    return S, lr, lc, ref


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("trans", [False, True])
def test_one_exponential_softmax_pair_and_its_guard(trans):
    """exp(S - lc) as exp(S - lr) times a row and a column factor: exact within the span guard;
    a tile whose lse spread exceeds it takes two exponentials. Forcing the factored form on the
    wide tile (span 1e30) loses the underflowed entries, which shows that the guard matters and
    that the wide case really took the other branch."""
    M, N = 29, 21
    for wide, span, ok in ((False, 50.0, True), (True, 50.0, True), (True, 1e30, False)):
        S, lr, lc, ref = _softmax_pair_case(M, N, wide)
        s32 = (S.T if trans else S).float().contiguous()
        out = torch.zeros_like(s32)
        _softmax_pair_kernel[(1,)](s32, lr.float(), lc.float(), out, M, N, BM=32, BN=32, TRANS=trans, SPAN=span)
        got = (out.T if trans else out).double()
        close = bool(torch.isfinite(got).all()) and torch.allclose(got, ref, rtol=1e-5, atol=1e-30)
        assert close is ok, (wide, span, (got - ref).abs().max())


def test_l2_bytes_count_what_each_tile_reloads():
    """Hand counts at b = 16,384, d = 512, bf16 (the GPU sweep's size): the 64 x 128 forward loads
    both operand blocks per tile, (1/128 + 1/64) b^2 d 2 bytes; the FULL backward streams one
    operand per program, (1/64 + 1/64) b^2 d 2 plus each block once; the d-chunked backward
    recomputes S for each of its 4 output chunks (BD 128)."""
    from kernels.contrastive_triton import _as_tiles, l2_bytes

    b, d = 16384, 512
    assert l2_bytes(b, b, d, 2, _as_tiles((64, 128, 64, 128, 4, 3), d), "fwd") == 256 * 128 * 192 * 512 * 2
    assert 256 * 128 * 192 * 512 * 2 == 6_442_450_944
    full = _as_tiles((64, 64, 64, 512, 8, 2, 1), d)
    assert full["FULL"] and l2_bytes(b, b, d, 2, full, "bwd") == (256 * b * 2 + 2 * b) * 512 * 2
    chunked = _as_tiles((64, 64, 64, 128, 8, 3), d)
    assert not chunked["FULL"] and l2_bytes(b, b, d, 2, chunked, "bwd") == 4 * 256 * 256 * (2 * 128 * 512 + 128 * 128) * 2
