"""Triton implicit-GEMM conv3d against fp64 torch (F.conv3d + batch_norm + ReLU), fresh random
inputs every run. CPU: the kernels in the interpreter, fp32 (IEEE dots) and fp16 (the
interpreter gets bf16 dots wrong, NOTES.md). GPU: bf16 too."""
import os
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from kernels.conv3d import (bn_affine, conv3d_dgrad, conv3d_forward, conv3d_triton, conv3d_wgrad, conv_block_inference,
                            conv_tiles, fixed_tiles, reference_conv3d)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)
TOL = {torch.float32: 3e-4 if CUDA else 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}

# (Cin, Cout, spatial, kernel, stride, padding): odd channel counts and sizes, the tower's
# kernels 1/3 (blocks, downsample), 7 (standard stem), 2 and 4 (k2s2, k4s4 stems)
CASES = [(5, 7, (5, 6, 7), 3, 1, 1), (6, 9, (7, 5, 6), 3, 2, 1), (5, 3, (6, 7, 5), 1, 2, 0),
         (1, 6, (9, 8, 11), 7, 2, 3), (1, 5, (8, 6, 10), 2, 2, 0), (1, 4, (8, 12, 9), 4, 4, 0),
         (64, 9, (3, 4, 5), 3, 2, 1),  # channels a multiple of the K tile
         (4, 5, (5, 3, 7), 2, 2, 1)]  # padded even kernel: the dgrad's parity classes get 1 tap each, shifted


def rel_err(a, r):
    a, r = a.detach().double(), r.detach().double()
    return float((a - r).norm() / r.norm().clamp_min(1e-30))


def make_x(n, c, sp, dtype):
    return torch.randn(n, c, *sp, dtype=torch.float64, device=DEV).to(dtype).contiguous(
        memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[0]}-{c[1]}_k{c[3]}s{c[4]}p{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_with_epilogue(case, dtype):
    cin, cout, sp, k, s, p = case
    x = make_x(2, cin, sp, dtype)
    w = (torch.randn(cout, cin, k, k, k, device=DEV) / (cin * k ** 3) ** 0.5).to(dtype)
    b = torch.randn(cout, device=DEV)
    ref, ref_st = reference_conv3d(x.double(), w.double(), b.double(), s, p)
    res = torch.randn_like(ref).to(dtype)
    y, st = conv3d_forward(x, w, b, s, p, residual=res, relu=True, stats=True)
    want = torch.relu(ref + res.double())
    assert torch.isfinite(y).all()
    assert rel_err(y, want) < TOL[dtype], rel_err(y, want)
    assert rel_err(st, ref_st) < TOL[dtype] * 10, rel_err(st, ref_st)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[0]}-{c[1]}_k{c[3]}s{c[4]}p{c[5]}")
def test_backward_against_fp64(case):
    cin, cout, sp, k, s, p = case
    x = make_x(2, cin, sp, torch.float32).requires_grad_()
    w = (torch.randn(cout, cin, k, k, k, device=DEV) / (cin * k ** 3) ** 0.5).requires_grad_()
    b = torch.randn(cout, device=DEV, requires_grad=True)
    y = conv3d_triton(x, w, b, s, p)
    g = torch.randn_like(y)
    y.backward(g)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    F.conv3d(xr, wr, br, s, p).backward(g.double())
    for name, a, r in [("dx", x.grad, xr.grad), ("dw", w.grad, wr.grad), ("db", b.grad, br.grad)]:
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) < TOL[torch.float32], (name, rel_err(a, r))


@pytest.mark.parametrize("tiles", [((64, 32, 32, 4, 1), (32, 64, 32, 4, 1), (32, 32, 64, 4, 1)),
                                   ((32, 32, 16, 4, 1), None, (64, 64, 16, 4, 1))])
def test_fixed_tiles_reach_each_kernel(tiles):
    """Tiles from the config's `kernels:` section (fixed_tiles) replace conv_tiles' choice for the
    kinds they name, and each kernel is still right, with the statistics epilogue, on odd sizes
    that leave every tile dimension partly masked."""
    from kernels.tuning.compile_report import trace_launches

    rule = fixed_tiles(*tiles)
    cin, cout, sp, k, s, p = 6, 9, (7, 5, 6), 3, 2, 1
    x = make_x(2, cin, sp, torch.float32).requires_grad_()
    w = (torch.randn(cout, cin, k, k, k, device=DEV) / (cin * k ** 3) ** 0.5).requires_grad_()
    y, st = conv3d_forward(x.detach(), w.detach(), None, s, p, stats=True, tiles=rule)
    yt = conv3d_triton(x, w, None, s, p, tiles=rule)
    g = torch.randn_like(yt)
    launches = trace_launches(lambda: yt.backward(g))
    xr, wr = (t.detach().double().requires_grad_() for t in (x, w))
    ref, ref_st = reference_conv3d(xr, wr, None, s, p)
    ref.backward(g.double())
    for name, a, r in [("y", y, ref), ("stats", st, ref_st), ("dx", x.grad, xr.grad), ("dw", w.grad, wr.grad)]:
        assert rel_err(a, r) < TOL[torch.float32], (name, rel_err(a, r))
    got = {kernel.__name__: tuple(meta[k] for k in ("BM", "BN", "BK", "num_warps", "num_stages"))
           for kernel, _, _, meta in launches}
    for kind, name in (("dgrad", "conv_dgrad_kernel"), ("wgrad", "conv_wgrad_kernel")):
        tile = tiles[("fwd", "dgrad", "wgrad").index(kind)]
        assert got[name] == (tile or got[name]), (kind, got)


def test_tile_rules_reject_what_they_cannot_launch():
    with pytest.raises(ValueError, match="kind must be one of"):
        conv_tiles("forward", 64, 64, 64)
    with pytest.raises(ValueError, match="BM, BN, BK, num_warps, num_stages"):
        fixed_tiles(fwd=(64, 64, 32))


def test_training_bn_statistics_and_running_update():
    """Stats from the epilogue give the same normalisation and running statistics as BatchNorm3d."""
    from kernels.conv3d import update_running_stats

    x = make_x(3, 5, (6, 6, 6), torch.float32)
    w = torch.randn(7, 5, 3, 3, 3, device=DEV) / 12
    bn_ref = torch.nn.BatchNorm3d(7).to(DEV).double().train()
    bn_ref.weight.data.uniform_(0.5, 1.5)
    bn_ref.bias.data.normal_()
    bn = torch.nn.BatchNorm3d(7).to(DEV)
    bn.load_state_dict({k: v.float() for k, v in bn_ref.state_dict().items()})
    y, st = conv3d_forward(x, w, None, 1, 1, stats=True)
    count = y.numel() // 7
    scale, shift, mean, var = bn_affine(st, bn.weight.detach(), bn.bias.detach(), bn.eps)
    update_running_stats(bn, mean, var, count)
    ref = bn_ref(F.conv3d(x.double(), w.double(), None, 1, 1))
    got = y * scale.view(1, -1, 1, 1, 1) + shift.view(1, -1, 1, 1, 1)
    assert rel_err(got, ref) < 1e-4
    for name in ("running_mean", "running_var"):
        assert rel_err(getattr(bn, name), getattr(bn_ref, name)) < 1e-5, name


def test_bn_statistics_when_the_mean_dwarfs_the_std():
    """Per-channel means 300x the std (a biased convolution): E[y^2] - mean^2 in fp32 cancels
    to 4-6% error in the variance here; the row tiles' centred moments, merged by Chan's rule,
    keep it to fp32 rounding. 2970 rows: many tiles and a short last one."""
    x = make_x(3, 5, (9, 10, 11), torch.float32)
    w = torch.randn(4, 5, 3, 3, 3, device=DEV) / 12
    b = 300.0 + torch.randn(4, device=DEV)
    _, st = conv3d_forward(x, w, b, 1, 1, stats=True)
    _, ref = reference_conv3d(x.double(), w.double(), b.double(), 1, 1)
    assert ref[1].min() > 0.1 and ref[0].abs().min() > 200  # the regime this test is about
    assert rel_err(st[0], ref[0]) < 1e-6
    assert ((st[1].double() - ref[1]).abs() / ref[1]).max() < 1e-4, (st[1], ref[1])


@pytest.mark.parametrize("c", [6, 64])
def test_inference_block_with_folded_bn(c):
    x = make_x(2, c, (5, 6, 7), torch.float32)
    w = torch.randn(6, c, 3, 3, 3, device=DEV) / (c * 27) ** 0.5
    bn = torch.nn.BatchNorm3d(6).to(DEV).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_()
    res = torch.randn(2, 6, 5, 6, 7, device=DEV)
    y = conv_block_inference(x, w, bn, 1, 1, residual=res, relu=True)
    with torch.no_grad():
        ref = torch.relu(bn.double()(F.conv3d(x.double(), w.double(), None, 1, 1)) + res.double())
    assert rel_err(y, ref) < 1e-5


def check_bf16(case, tiles=None, ctx=nullcontext):
    """Forward and both gradients in bf16 against fp64, with tile rule `tiles`, inside `ctx()`."""
    cin, cout, sp, k, s, p = case
    x = make_x(2, cin, sp, torch.bfloat16).requires_grad_()
    w = (torch.randn(cout, cin, k, k, k, device=DEV) / (cin * k ** 3) ** 0.5).bfloat16().requires_grad_()
    with ctx():
        y = conv3d_triton(x, w, None, s, p, tiles=tiles)
        g = torch.randn_like(y)
        y.backward(g)
    xr, wr = (t.detach().double().requires_grad_() for t in (x, w))
    yr = F.conv3d(xr, wr, None, s, p)
    yr.backward(g.double())
    for name, a, r in [("y", y, yr), ("dx", x.grad, xr.grad), ("dw", w.grad, wr.grad)]:
        assert rel_err(a.detach(), r.detach()) < TOL[torch.bfloat16], (name, rel_err(a.detach(), r.detach()))


@pytest.mark.skipif(not CUDA, reason="the interpreter gets bf16 dots wrong; runs on the lent GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[0]}-{c[1]}_k{c[3]}s{c[4]}p{c[5]}")
def test_cuda_bf16(case):
    check_bf16(case)


def _towers(stem, norm="bn"):
    from ctvlp_dist.models.resnet3d import ResNet3d18

    torch.manual_seed(0)
    ref = ResNet3d18(stem=stem, norm=norm, gn_groups=4, conv_impl="torch", width=8).to(DEV)
    tri = ResNet3d18(stem=stem, norm=norm, gn_groups=4, conv_impl="triton", width=8).to(DEV)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


@pytest.mark.slow
def test_resnet3d18_triton_matches_torch():
    """The whole tower, forward and backward, conv_impl=triton (fp32; the fused BN blocks and
    stem) against conv_impl=torch in fp64, BN in training mode, so the running statistics are
    compared too. Tiny volume, k4s4 stem, width 8 (64..8 x 8 channels: the interpreter's cost
    grows with the channel count)."""
    ref, tri = _towers("k4s4")
    ref.double()
    assert tri.stem._fused is not None and all(b._fused is not None for layer in tri.layers for b in layer)
    x = torch.randn(2, 1, 16, 32, 32, device=DEV)
    ya, yb = ref(x.double()), tri(x)
    assert rel_err(yb, ya) < 1e-4
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g.float())
    worst = max(rel_err(pb.grad, pa.grad) for pa, pb in zip(ref.parameters(), tri.parameters()))
    assert worst < 1e-3, worst
    for (name, a), (_, b) in zip(ref.named_buffers(), tri.named_buffers()):
        if a.is_floating_point():
            assert rel_err(b, a) < 1e-4, (name, rel_err(b, a))
        else:
            assert torch.equal(a, b), name


@pytest.mark.slow
def test_short_training_loss_curves_agree():
    """Convergence (as Liger tests it): SGD steps of each implementation on the same batches give
    the same loss curve. GroupNorm: BatchNorm over 2 scans at 1 voxel (layer 4) turns rounding
    differences into different trajectories within a few steps, which would test chaos, not us."""
    ref, tri = _towers("k4s4", norm="gn")
    head_r, head_t = torch.nn.Linear(64, 3).to(DEV), torch.nn.Linear(64, 3).to(DEV)
    head_t.load_state_dict(head_r.state_dict())
    opt_r = torch.optim.SGD([*ref.parameters(), *head_r.parameters()], lr=0.02, momentum=0.9)
    opt_t = torch.optim.SGD([*tri.parameters(), *head_t.parameters()], lr=0.02, momentum=0.9)
    gen = torch.Generator(device=DEV).manual_seed(1)
    curves = ([], [])
    for _ in range(5):
        x = torch.randn(2, 1, 16, 16, 16, device=DEV, generator=gen)
        yl = torch.randint(0, 2, (2, 3), device=DEV, generator=gen).float()
        for (m, h, o), c in zip(((ref, head_r, opt_r), (tri, head_t, opt_t)), curves):
            loss = F.binary_cross_entropy_with_logits(h(m(x)), yl)
            o.zero_grad()
            loss.backward()
            o.step()
            c.append(loss.item())
    assert max(abs(a - b) for a, b in zip(*curves)) < 1e-3, curves


def test_inference_folds_once_and_refolds_after_a_change():
    """conv_block_inference caches the folded GEMM-layout weight per weight tensor; an in-place
    change to the BN statistics or to the weight (an optimizer step, load_state_dict) refolds."""
    x = make_x(2, 6, (4, 5, 3), torch.float32)
    w = torch.randn(5, 6, 3, 3, 3, device=DEV) / 13
    bn = torch.nn.BatchNorm3d(5).to(DEV).eval()
    bn.running_var.uniform_(0.5, 2.0)

    def ref():
        with torch.no_grad():
            return torch.relu(bn.double()(F.conv3d(x.double(), w.double(), None, 1, 1))).float()

    y1 = conv_block_inference(x, w, bn, 1, 1)
    first = w._ctvlp_folded[1]
    y2 = conv_block_inference(x, w, bn, 1, 1)
    assert w._ctvlp_folded[1] is first and torch.equal(y1, y2)
    bn.float()
    assert rel_err(y1, ref()) < 1e-5
    bn.running_var.mul_(3.0)
    y3 = conv_block_inference(x, w, bn, 1, 1)
    assert w._ctvlp_folded[1] is not first and rel_err(y3, ref()) < 1e-5
    bn.float()
    w.mul_(-1.0)
    assert rel_err(conv_block_inference(x, w, bn, 1, 1), ref()) < 1e-5
