"""The fused training block and stem (conv3d_block.py) against the torch modules in fp64: output,
input gradient, every weight, gamma and beta gradient, and the BatchNorm running statistics.
CPU: Triton in the interpreter, fp32 and fp16 (NOTES.md: bf16 dots are wrong there)."""
import os

import pytest
import torch
import torch.nn.functional as F

from kernels.conv3d_block import BNState, bn_backward_coefs, fused_basic_block, fused_conv_bn_relu

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)
TOL = {torch.float32: 3e-4 if CUDA else 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="the interpreter gets bf16 dots wrong; runs on the lent GPU"))]


def _err(a, r):
    a, r = a.detach().double(), r.detach().double()
    return float((a - r).norm() / r.norm().clamp_min(1e-30))


def _bns(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm3d)]


def randomised_pair(make, dtype):
    """The torch module in fp64 (the reference) and a copy in `dtype`, BN affine parameters and
    running statistics randomised so that no term is trivially zero or one.

    Half precision: BN biases of +8 keep every ReLU input far from zero. Otherwise some land
    within rounding of it, their gate flips against fp64, and that one element's gradient, spread
    by the next dgrad, is wholly different: a test of chance, not of the kernels. The gates
    themselves are checked in fp32, where the comparison is exact."""
    torch.manual_seed(torch.randint(0, 2 ** 31, ()).item())
    ref = make().to(DEV).double()
    for bn in _bns(ref):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
        if dtype != torch.float32:
            bn.bias.data.add_(8.0)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    dut = make().to(DEV)
    dut.load_state_dict(ref.state_dict())
    return ref, dut.to(dtype)


def compare_to_torch(ref, dut, run_ref, run_dut, x, dtype, grad=True):
    xr = x.detach().double().requires_grad_(grad)
    xd = x.detach().to(dtype).contiguous(memory_format=torch.channels_last_3d).requires_grad_(grad)
    yr, yd = run_ref(xr), run_dut(xd)
    assert torch.isfinite(yd).all()
    assert _err(yd, yr) < TOL[dtype], ("y", _err(yd, yr))
    if grad:
        g = torch.randn_like(yr)
        yr.backward(g)
        yd.backward(g.to(dtype))
        assert _err(xd.grad, xr.grad) < TOL[dtype], ("dx", _err(xd.grad, xr.grad))
        for (name, pr), (_, pd) in zip(ref.named_parameters(), dut.named_parameters()):
            assert pd.grad is not None and pd.grad.dtype == pd.dtype, name
            assert _err(pd.grad, pr.grad) < TOL[dtype] * 2, (name, _err(pd.grad, pr.grad))
    for (name, br), (_, bd) in zip(ref.named_buffers(), dut.named_buffers()):
        if br.is_floating_point():
            assert _err(bd, br) < TOL[dtype], (name, _err(bd, br))
        else:
            assert torch.equal(bd, br), name


def make_block(cin, cout, stride):
    from ctvlp_dist.models.resnet3d import BasicBlock3d

    return lambda: BasicBlock3d(cin, cout, stride, "bn", 1, "torch")


# (Cin, Cout, stride, spatial): identity shortcut; downsampling 1^3 stride-2 shortcut; a channel
# change at stride 1 (1^3 shortcut); odd sizes and channel counts throughout
BLOCKS = [(6, 6, 1, (5, 6, 7)), (5, 7, 2, (7, 6, 5)), (3, 5, 1, (4, 5, 3))]


@pytest.mark.parametrize("case", BLOCKS, ids=lambda c: f"c{c[0]}-{c[1]}s{c[2]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_block_matches_torch(case, dtype):
    cin, cout, s, sp = case
    ref, dut = randomised_pair(make_block(cin, cout, s), dtype)
    x = torch.randn(2, cin, *sp, device=DEV, dtype=torch.float64)
    compare_to_torch(ref, dut, ref, lambda t: fused_basic_block(dut, t), x, dtype)


def test_eval_mode_block_with_grad_uses_running_stats():
    """Eval-mode BN under autograd (a frozen-statistics fine-tune): normalised by the running
    statistics, which stay put; the backward has no batch-statistics terms."""
    ref, dut = randomised_pair(make_block(5, 7, 2), torch.float32)
    ref.eval(), dut.eval()
    x = torch.randn(2, 5, 6, 5, 7, device=DEV, dtype=torch.float64)
    compare_to_torch(ref, dut, ref, lambda t: fused_basic_block(dut, t), x, torch.float32)


@pytest.mark.parametrize("case", BLOCKS[:2], ids=lambda c: f"c{c[0]}-{c[1]}s{c[2]}")
def test_inference_block_folds_bn(case):
    cin, cout, s, sp = case
    ref, dut = randomised_pair(make_block(cin, cout, s), torch.float32)
    ref.eval(), dut.eval()
    x = torch.randn(2, cin, *sp, device=DEV, dtype=torch.float64)
    with torch.no_grad():
        compare_to_torch(ref, dut, ref, lambda t: fused_basic_block(dut, t), x, torch.float32, grad=False)


# (kernel, stride, padding): the standard 7^3 stem and the lite k4s4 stem
@pytest.mark.parametrize("stem", [(7, 2, 3), (4, 4, 0)], ids=["k7s2p3", "k4s4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_stem_conv_bn_relu_matches_torch(stem, dtype):
    k, s, p = stem
    make = lambda: torch.nn.Sequential(torch.nn.Conv3d(1, 6, k, s, p, bias=False), torch.nn.BatchNorm3d(6),  # noqa: E731
                                       torch.nn.ReLU())
    ref, dut = randomised_pair(make, dtype)
    x = torch.randn(2, 1, 8, 9, 7, device=DEV, dtype=torch.float64)
    compare_to_torch(ref, dut, ref, lambda t: fused_conv_bn_relu(dut[0], dut[1], t), x, dtype)


@pytest.mark.parametrize("batch_stats", [True, False])
def test_bn_backward_coefficients_against_autograd(batch_stats):
    """dY = alpha dZ + beta Y + gamma and d gamma, d beta from the two reductions: the algebra the
    kernels rely on, checked against autograd through F.batch_norm (plain torch, fp64)."""
    C, eps = 5, 1e-5
    y = (torch.randn(3, C, 4, 5, 6, dtype=torch.float64) * 2 + 1).requires_grad_()
    gamma = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(C, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    z = F.batch_norm(y, rm.clone(), rv.clone(), gamma, beta, training=batch_stats, eps=eps)
    dz = torch.randn_like(z)
    z.backward(dz)
    dims, n = (0, 2, 3, 4), y[:, 0].numel()
    mean = y.detach().mean(dims) if batch_stats else rm
    var = y.detach().var(dims, unbiased=False) if batch_stats else rv
    rstd = torch.rsqrt(var + eps)
    st = BNState(gamma.detach() * rstd, beta.detach() - mean * gamma.detach() * rstd, mean, rstd, n, batch_stats,
                 gamma.dtype)
    yc = y.detach() - mean.view(1, -1, 1, 1, 1)
    (al, be, ga), dg, db = bn_backward_coefs(st, dz.sum(dims), (dz * yc).sum(dims))
    v = lambda t: t.view(1, -1, 1, 1, 1)  # noqa: E731
    dy = v(al) * dz + v(be) * y.detach() + v(ga)
    assert _err(dy, y.grad) < 1e-12
    assert _err(dg, gamma.grad) < 1e-12 and _err(db, beta.grad) < 1e-12


def test_training_bn_needs_more_than_one_value():
    ref, dut = randomised_pair(make_block(4, 4, 1), torch.float32)
    x = torch.randn(1, 4, 1, 1, 1, device=DEV).contiguous(memory_format=torch.channels_last_3d)
    with pytest.raises(ValueError, match="more than 1 value"):
        fused_basic_block(dut, x)


def _mini_tower(impl):
    """Stem (k2s2) -> identity block -> downsampling block -> pool -> linear head: every fused
    BatchNorm unit, at sizes where each BatchNorm sees >= 108 values per channel (4 scans at 3^3)."""
    from ctvlp_dist.models.ops import Conv3d
    from ctvlp_dist.models.resnet3d import BasicBlock3d, Stem3d

    return torch.nn.Sequential(
        Stem3d(Conv3d(1, 8, 2, stride=2, bias=False, impl=impl), torch.nn.BatchNorm3d(8), torch.nn.ReLU(), impl=impl),
        BasicBlock3d(8, 8, 1, "bn", 1, impl), BasicBlock3d(8, 12, 2, "bn", 1, impl),
        torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(12, 3))


@pytest.mark.slow
def test_short_training_loss_curves_agree_with_batchnorm():
    """Convergence, as Liger tests it, for the fused BatchNorm path: SGD with momentum on the same
    batches from the same weights; the fused units (fp32) follow torch (fp64) step by step, loss,
    weights and running statistics alike. The loss must also fall: a run that learns nothing
    would agree trivially."""
    torch.manual_seed(0)
    ref = _mini_tower("torch").to(DEV).double()
    dut = _mini_tower("triton").to(DEV)
    dut.load_state_dict(ref.state_dict())
    assert all(m._fused is not None for m in dut.modules() if hasattr(m, "_fused"))
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, dut)]
    gen = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(4, 1, 12, 12, 12, device=DEV, generator=gen)
    x[:2] += 0.5 * torch.randn(2, 1, 1, 1, 1, device=DEV, generator=gen)  # something to learn
    label = torch.tensor([[1.0, 0, 1], [1, 0, 1], [0, 1, 0], [0, 1, 0]], device=DEV)
    curves = ([], [])
    for _ in range(8):
        for m, opt, c, dt in zip((ref, dut), opts, curves, (torch.float64, torch.float32)):
            xs = x.to(dt).contiguous(memory_format=torch.channels_last_3d)
            loss = F.binary_cross_entropy_with_logits(m(xs), label.to(dt))
            opt.zero_grad()
            loss.backward()
            opt.step()
            c.append(loss.item())
    assert max(abs(a - b) for a, b in zip(*curves)) < 1e-5, curves  # measured: 5e-8
    assert curves[0][-1] < 0.8 * curves[0][0], curves[0]
    for (name, a), (_, b) in zip(ref.state_dict().items(), dut.state_dict().items()):
        if a.is_floating_point():
            assert _err(b, a) < 1e-5, (name, _err(b, a))  # measured: <= 7e-7
        else:
            assert torch.equal(a, b), name
