"""Blockwise CLIP loss vs the dense fp64 reference: loss and all three gradients, fresh random
inputs every run. CPU: Triton kernels in the interpreter and the chunked torch path. GPU:
the compiled kernels, bf16 included (the interpreter gets bf16 dots wrong)."""
import os

import pytest
import torch

from kernels.contrastive import blockwise_clip_loss, reference_clip_loss
from kernels.contrastive_triton import ClipTiles

CUDA = torch.cuda.is_available()
CPU_IMPLS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
# ||out - ref|| / ||ref|| bounds: fp32 far under 1e-3, tf32 ~3e-4, fp16/bf16 1e-3..1e-2.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def case(b, d, dtype, grouped, scale, device, normalise=True, matched=0):
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


def check(impl, b, d, dtype, grouped, scale, device="cpu", tol=None, tf32=False, matched=0, loss_fn=None, **kw):
    """Loss and the three gradients of `loss_fn` (default blockwise_clip_loss with impl and kw)
    against the dense fp64 reference on the same rounded inputs."""
    I, T, s, g = case(b, d, dtype, grouped, scale, device, matched=matched)
    # the reference sees exactly the rounded inputs the kernel sees
    I, T = I.to(dtype).double(), T.to(dtype).double()
    Ir, Tr, sr = (x.clone().requires_grad_() for x in (I, T, s))
    ref = reference_clip_loss(Ir, Tr, sr, group_ids=g)
    ref.backward()
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    Ik, Tk = I.to(dtype).requires_grad_(), T.to(dtype).requires_grad_()
    sk = s.to(sdt).requires_grad_()
    if loss_fn is None:
        out = blockwise_clip_loss(Ik, Tk, sk, group_ids=g, impl=impl, tf32=tf32, **kw)
    else:
        out = loss_fn(Ik, Tk, sk, group_ids=g, tf32=tf32, **kw)
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
    check(impl, b, d, torch.float32, grouped, scale)


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("fwd,bwd,d", [((32, 32, 32, 64, 4, 1), (32, 32, 32, 64, 4, 1, False), 300),
                                       ((32, 32, 64, 64, 4, 1), (32, 32, 64, 64, 4, 1, True), 200),
                                       ((64, 32, 32, 64, 4, 1), (64, 32, 32, 64, 4, 1, False), 300),
                                       ((32, 64, 64, 64, 4, 1), (32, 64, 64, 64, 4, 1, True), 200)])
def test_tiles_passed_as_arguments(fwd, bwd, d):
    """Tiles from the config's `kernels:` section reach the launches: chunked d (BD=64 < d: S
    recomputed per chunk) and FULL (one d chunk, no K loop; fp32 rows up to 256 wide); 32-row
    tiles give 5 row and column blocks, so the strided programs and both splits are exercised.
    BM != BN: the column pass works on S^T, so a swapped tile side shows."""
    from kernels.contrastive_triton import launch_tiles

    assert launch_tiles(bwd, d, 4)["FULL"] is bwd[6]
    check("triton", 130, d, torch.float32, True, 20.0, fwd_tiles=fwd, bwd_tiles=ClipTiles(*bwd))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_matched_pairs_at_scale_100(impl):
    """A trained model's batch: 20 matched pairs among unmatched ones, scale 100, whose lse sit
    ~80 above the rest."""
    check(impl, 130, 64, torch.float32, False, 100.0, matched=20)


@pytest.mark.skipif("triton" not in CPU_IMPLS, reason="needs the Triton interpreter")
def test_triton_backward_equals_the_chunked_path_on_rectangular_blocks():
    """The distributed path's shape: a rank's b_r rows against all b_c columns, dT in fp32. The
    Triton backward must give the chunked torch path's gradients (an independent implementation
    of the same formula, checked against fp64 above)."""
    from kernels.contrastive_ref import chunked_backward, merge_column_stats
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
    got = triton_backward(I, T, s, g_r, g_c, lse_r, lse_c, n_rows, 1.0 / b_c, False, grad_dtype=torch.float32)
    want = chunked_backward(I.double(), T.double(), s.double(), g_r.long(), g_c.long(), lse_r.double(), lse_c.double(),
                            n_rows.double(), 1.0 / b_c)
    for a, r in zip(got, want):
        assert a.dtype == torch.float32 and torch.allclose(a.double(), r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_cpu_fp16(impl):
    check(impl, 97, 64, torch.float16, True, 14.3)


def test_chunked_fp64_is_exact():
    check("torch", 300, 40, torch.float64, True, 50.0)


def test_group_ids_without_structure_equal_the_diagonal():
    I, T, s, _ = case(64, 32, torch.float64, False, 10.0, "cpu")
    a = blockwise_clip_loss(I, T, s, impl="torch")
    b = blockwise_clip_loss(I, T, s, group_ids=torch.arange(64) * 7 + 3, impl="torch")
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_sum_reduction_and_python_scale():
    I, T, s, g = case(50, 24, torch.float64, True, 3.0, "cpu")
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
    I, T, s, g = case(b, 16, torch.float32, True, 10.0, "cpu")
    I.requires_grad_()
    blockwise_clip_loss(I, T.float(), s.float(), group_ids=g, impl="torch").backward()
    assert 0 < biggest[0] <= 64 * b < b * b


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (runs on the lent GPU machine)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,d", [(1000, 40), (4097, 128), (2049, 300), (3000, 512)])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("bwd_tiles", [None, ClipTiles(64, 64, 64, 128, 8, 3)])
def test_cuda_triton_against_fp64(dtype, b, d, grouped, scale, bwd_tiles):
    """fp32 goes through tf32 (10-bit mantissa, ~3e-4 per logit); the gradient's p - t cancels
    much of p, which multiplies that relative error, hence 2e-3 on the gradients. The measured
    tiles (FULL backward in 16 bits), then the d-chunked backward."""
    check("triton", b, d, dtype, grouped, scale, device="cuda", tol=2e-3 if dtype == torch.float32 else None,
           tf32=dtype == torch.float32, bwd_tiles=bwd_tiles)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (runs on the lent GPU machine)")
@pytest.mark.parametrize("b,d,grouped", [(1000, 40, False), (2049, 300, True)])
def test_cuda_fp32_without_tf32(b, d, grouped):
    check("triton", b, d, torch.float32, grouped, 30.0, device="cuda", tol=1e-4, tf32=False)


def masked_case(b, d, grouped, drop, dtype, device="cpu"):
    """A batch whose `drop` rows are masked; their features are large (finite) garbage, which
    must not reach the loss or the other rows' gradients."""
    I, T, s, g = case(b, d, torch.float64, grouped, 20.0, device)
    valid = torch.ones(b, dtype=torch.bool, device=device)
    valid[torch.randperm(b, device=device)[:drop]] = False
    I[~valid], T[~valid] = 50 * torch.randn(drop, d, dtype=torch.float64, device=device), -30.0
    return I.to(dtype).double(), T.to(dtype).double(), s, g, valid


@pytest.mark.parametrize("impl,dtype,device", [("torch", torch.float64, "cpu")]
                         + [("triton", torch.float32, "cpu")] * ("triton" in CPU_IMPLS)
                         + [("triton", torch.float32, "cuda")] * CUDA)
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("drop", [1, 37, 100])
def test_valid_mask_equals_removing_the_rows(impl, dtype, device, grouped, drop):
    """Masking pairs gives the loss and gradients of the batch without them (fp64 reference on
    the removed batch, as a test of the reference's own `valid`); masked rows get exactly zero
    gradient; the mean is over valid rows. drop=100: no valid pair, a zero loss and zero grads.
    The Triton kernels accumulate in fp32, so they run on fp32 inputs."""
    b = 100
    I, T, s, g, valid = masked_case(b, 48, grouped, drop, dtype, device)
    Ir, Tr, sr = I[valid].clone().requires_grad_(), T[valid].clone().requires_grad_(), s.clone().requires_grad_()
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    Ik, Tk, sk = I.to(dtype).requires_grad_(), T.to(dtype).requires_grad_(), s.to(sdt).requires_grad_()
    out = blockwise_clip_loss(Ik, Tk, sk, group_ids=g, valid=valid, impl=impl, tf32=False)
    out.backward()
    assert torch.count_nonzero(Ik.grad[~valid]) == 0 and torch.count_nonzero(Tk.grad[~valid]) == 0
    if drop == b:
        assert out.item() == 0 and sk.grad.item() == 0
        return
    ref = reference_clip_loss(Ir, Tr, sr, group_ids=None if g is None else g[valid])
    ref.backward()
    masked_ref = reference_clip_loss(I, T, s, group_ids=g, valid=valid)
    assert torch.equal(masked_ref, ref.detach())
    tol = TOL[dtype]
    for name, a, r in [("loss", out, ref), ("dI", Ik.grad[valid], Ir.grad), ("dT", Tk.grad[valid], Tr.grad),
                       ("dscale", sk.grad, sr.grad)]:
        err = float((a.detach().double() - r.detach()).norm() / r.detach().norm().clamp_min(1e-30))
        assert err < tol, f"{impl} drop={drop} groups={grouped}: {name} rel err {err:.2e}"


def test_valid_mask_is_checked():
    I, T, s, _ = case(8, 4, torch.float64, False, 1.0, "cpu")
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        blockwise_clip_loss(I, T, s, valid=torch.ones(8), impl="torch")
