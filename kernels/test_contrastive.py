"""Blockwise CLIP loss vs the dense fp64 reference: loss and all three gradients, fresh random
inputs every run. CPU: Triton kernels in the interpreter and the chunked torch path. GPU:
the compiled kernels, bf16 included (the interpreter gets bf16 dots wrong)."""
import os

import pytest
import torch

from kernels.contrastive import blockwise_clip_loss, reference_clip_loss

CUDA = torch.cuda.is_available()
CPU_IMPLS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
# ||out - ref|| / ||ref|| bounds (METHOD.md): fp32 far under 1e-3, tf32 ~3e-4, fp16/bf16 1e-3..1e-2.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _case(b, d, dtype, grouped, scale, device, normalise=True):
    I = torch.randn(b, d, dtype=torch.float64, device=device)
    T = torch.randn(b, d, dtype=torch.float64, device=device)
    if normalise:
        I, T = I / I.norm(dim=1, keepdim=True), T / T.norm(dim=1, keepdim=True)
    g = torch.randint(0, max(2, b // 8), (b,), device=device) if grouped else None
    s = torch.tensor(float(scale), dtype=torch.float64, device=device)
    return I, T, s, g


def _check(impl, b, d, dtype, grouped, scale, device="cpu", tol=None, tf32=False):
    I, T, s, g = _case(b, d, dtype, grouped, scale, device)
    # the reference sees exactly the rounded inputs the kernel sees
    I, T = I.to(dtype).double(), T.to(dtype).double()
    Ir, Tr, sr = (x.clone().requires_grad_() for x in (I, T, s))
    ref = reference_clip_loss(Ir, Tr, sr, group_ids=g)
    ref.backward()
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    Ik, Tk = I.to(dtype).requires_grad_(), T.to(dtype).requires_grad_()
    sk = s.to(sdt).requires_grad_()
    out = blockwise_clip_loss(Ik, Tk, sk, group_ids=g, impl=impl, tf32=tf32)
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
    splits are exercised. BM != BN: the column pass works on S^T, so a swapped tile side shows."""
    from kernels.contrastive_triton import pick_tiles

    monkeypatch.setenv("CTVLP_CLIP_TILES", tiles)
    assert pick_tiles(d, torch.float32, "bwd")["FULL"] is full
    _check("triton", 130, d, torch.float32, True, 20.0)


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("b,d,grouped", [(100, 40, False), (130, 300, True)])
def test_fused_backward_variant(monkeypatch, b, d, grouped):
    monkeypatch.setenv("CTVLP_CLIP_BACKWARD", "fused")
    _check("triton", b, d, torch.float32, grouped, 30.0)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_cpu_fp16(impl):
    _check(impl, 97, 64, torch.float16, True, 14.3)


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
@pytest.mark.parametrize("backward", ["two_pass", "fused"])
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
