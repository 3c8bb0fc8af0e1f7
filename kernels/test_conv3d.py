"""Triton implicit-GEMM conv3d against fp64 torch (F.conv3d + batch_norm + ReLU), fresh random
inputs every run. CPU: the kernels in the interpreter, fp32 (IEEE dots) and fp16 (the
interpreter gets bf16 dots wrong, NOTES.md). GPU: bf16 too."""
import os

import pytest
import torch
import torch.nn.functional as F

from kernels import conv3d, conv3d_triton as conv3d_kernels
from kernels.conv3d import (SWAP_TILES, TILE_GRID, bn_affine, conv3d_forward, conv3d_triton, conv_block_inference, reference_conv3d,
                            tile_override)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)
TOL = {torch.float32: 3e-4 if CUDA else 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}

# (Cin, Cout, spatial, kernel, stride, padding): odd channel counts and sizes, the tower's
# kernels 1/3 (blocks, downsample), 7 (standard stem), 2 and 4 (k2s2, k4s4 stems)
CASES = [(5, 7, (5, 6, 7), 3, 1, 1), (6, 9, (7, 5, 6), 3, 2, 1), (5, 3, (6, 7, 5), 1, 2, 0),
         (1, 6, (9, 8, 11), 7, 2, 3), (1, 5, (8, 6, 10), 2, 2, 0), (1, 4, (8, 12, 9), 4, 4, 0),
         (64, 9, (3, 4, 5), 3, 2, 1),  # channels a multiple of the K tile: the per-tap forward loop
         (4, 5, (5, 3, 7), 2, 2, 1)]  # padded even kernel: the dgrad's parity classes get 1 tap each, shifted


def _err(a, r):
    a, r = a.detach().double(), r.detach().double()
    return float((a - r).norm() / r.norm().clamp_min(1e-30))


def _x(n, c, sp, dtype):
    return torch.randn(n, c, *sp, dtype=torch.float64, device=DEV).to(dtype).contiguous(
        memory_format=torch.channels_last_3d)


def _fwd_case(case, dtype):
    """Inputs of a forward with every epilogue and the prologue, and its fp64 reference:
    (x, w, b, scale, shift, residual, (y, stats) expected)."""
    cin, cout, sp, k, s, p = case
    k = k if isinstance(k, tuple) else (k,) * 3
    x = _x(2, cin, sp, dtype)
    w = (torch.randn(cout, cin, *k, device=DEV) / (cin * k[0] * k[1] * k[2]) ** 0.5).to(dtype)
    b = torch.randn(cout, device=DEV)
    scale, shift = torch.rand(cin, device=DEV) + 0.5, torch.randn(cin, device=DEV) + 0.5
    ref, ref_st = reference_conv3d(x.double(), w.double(), b.double(), s, p, in_scale=scale.double(),
                                   in_shift=shift.double())
    res = torch.randn_like(ref).to(dtype)
    return x, w, b, scale, shift, res, (torch.relu(ref + res.double()), ref_st)


def _check_fwd(case, dtype, x, w, b, scale, shift, res, expected):
    y, st = conv3d_forward(x, w, b, case[4], case[5], residual=res, relu=True, stats=True, in_scale=scale,
                           in_shift=shift)
    assert _err(y, expected[0]) < TOL[dtype]
    assert _err(st, expected[1]) < TOL[dtype] * 10


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[0]}-{c[1]}_k{c[3]}s{c[4]}p{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_with_epilogue(case, dtype):
    cin, cout, sp, k, s, p = case
    x = _x(2, cin, sp, dtype)
    w = (torch.randn(cout, cin, k, k, k, device=DEV) / (cin * k ** 3) ** 0.5).to(dtype)
    b = torch.randn(cout, device=DEV)
    ref, ref_st = reference_conv3d(x.double(), w.double(), b.double(), s, p)
    res = torch.randn_like(ref).to(dtype)
    y, st = conv3d_forward(x, w, b, s, p, residual=res, relu=True, stats=True)
    want = torch.relu(ref + res.double())
    assert torch.isfinite(y).all()
    assert _err(y, want) < TOL[dtype], _err(y, want)
    assert _err(st, ref_st) < TOL[dtype] * 10, _err(st, ref_st)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cin", [6, 64])  # flattened-K and per-tap loops
def test_bn_relu_prologue_keeps_padding_zero(dtype, cin):
    """conv(relu(x * scale + shift)) with zero padding applied after the activation: a positive
    shift would otherwise leak into the borders."""
    x = _x(2, cin, (5, 7, 6) if cin < 64 else (3, 4, 3), dtype)
    w = (torch.randn(5, cin, 3, 3, 3, device=DEV) / (cin * 27) ** 0.5).to(dtype)
    scale, shift = torch.rand(cin, device=DEV) + 0.5, torch.randn(cin, device=DEV) + 0.5
    y = conv3d_forward(x, w, None, 1, 1, in_scale=scale, in_shift=shift)
    ref, _ = reference_conv3d(x.double(), w.double(), None, 1, 1, in_scale=scale.double(), in_shift=shift.double())
    assert _err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[0]}-{c[1]}_k{c[3]}s{c[4]}p{c[5]}")
def test_backward_against_fp64(case):
    cin, cout, sp, k, s, p = case
    x = _x(2, cin, sp, torch.float32).requires_grad_()
    w = (torch.randn(cout, cin, k, k, k, device=DEV) / (cin * k ** 3) ** 0.5).requires_grad_()
    b = torch.randn(cout, device=DEV, requires_grad=True)
    y = conv3d_triton(x, w, b, s, p)
    g = torch.randn_like(y)
    y.backward(g)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    F.conv3d(xr, wr, br, s, p).backward(g.double())
    for name, a, r in [("dx", x.grad, xr.grad), ("dw", w.grad, wr.grad), ("db", b.grad, br.grad)]:
        assert torch.isfinite(a).all(), name
        assert _err(a, r) < TOL[torch.float32], (name, _err(a, r))


# channel counts that are multiples of the K tile (BK 32 here): the per-tap K loop applies
TAP_CASES = [(32, 9, (3, 4, 5), 3, 2, 1), (64, 5, (4, 3, 5), 3, 1, 1), (32, 7, (3, 5, 4), 1, 2, 0),
             (32, 4, (3, 5, 6), (1, 3, 2), 1, (0, 1, 1))]  # a non-cubic kernel: kd, kh, kw decoded apart


@pytest.mark.parametrize("case", TAP_CASES, ids=lambda c: f"c{c[0]}-{c[1]}_k{c[3]}s{c[4]}p{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_tap_loop(case, dtype, monkeypatch):
    """conv3d.K_LOOP = "tap": the tap's coordinates as scalars per K step. Same epilogue (bias,
    stats, residual, ReLU) and prologue (BN-ReLU) as the flat loop, against fp64; the launch
    really takes the TAP path (and the flat loop where Cin is no multiple of BK)."""
    from kernels.compile_report import capture

    monkeypatch.setattr(conv3d, "K_LOOP", "tap")
    cin, s, p = case[0], case[4], case[5]
    x, w, b, scale, shift, res, expected = _fwd_case(case, dtype)
    with tile_override((64, 64, 32, 4, 1), "fwd"):
        meta = capture(conv3d_forward, x.to("meta"), w.to("meta"), None, s, p)[0][3]
        odd = capture(conv3d_forward, x[:, :cin - 1].to("meta"), w[:, :cin - 1].to("meta"), None, s, p)[0][3]
        assert meta["TAP"] and not odd["TAP"]
        _check_fwd(case, dtype, x, w, b, scale, shift, res, expected)
    monkeypatch.setattr(conv3d, "K_LOOP", "tapp")
    with pytest.raises(ValueError, match="flat or tap"):
        conv3d_forward(x, w, b, s, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_with_activations_through_l1(dtype):
    """conv3d.ACT_L1 marks the tap loop's activation copies for L1 (ACT_CACHE ".ca"; l1_copies.py
    rewrites the PTX on the GPU): the same convolution with every epilogue and the prologue,
    swapped or not, against fp64; the flat loop (Cin no multiple of BK) takes no mark."""
    from kernels.compile_report import capture

    case = TAP_CASES[0]
    cin, s, p = case[0], case[4], case[5]
    x, w, b, scale, shift, res, expected = _fwd_case(case, dtype)
    for tile in ((64, 64, 32, 4, 1), (64, 64, 32, 4, 1, "swap")):
        with conv3d.k_loop("tap"), conv3d.act_l1(), tile_override(tile, "fwd"):
            meta = capture(conv3d_forward, x.to("meta"), w.to("meta"), None, s, p)[0][3]
            odd = capture(conv3d_forward, x[:, :cin - 1].to("meta"), w[:, :cin - 1].to("meta"), None, s, p)[0][3]
            assert meta["TAP"] and meta["ACT_CACHE"] == ".ca" and odd["ACT_CACHE"] == ""
            _check_fwd(case, dtype, x, w, b, scale, shift, res, expected)
    with conv3d.k_loop("tap"):  # restored on exit: no mark
        assert not conv3d.ACT_L1 and capture(conv3d_forward, x.to("meta"), w.to("meta"), None, s, p)[0][3]["ACT_CACHE"] == ""


# (case, K loop): the flat loop on odd channels and strides, the tap loop (Cin a multiple of BK)
SWAP_CASES = [(CASES[0], "flat"), (CASES[1], "flat"), (CASES[3], "flat"), ((64, 5, (4, 3, 5), 3, 1, 1), "tap"),
              ((32, 70, (3, 5, 4), 3, 2, 1), "tap")]  # 70 channels: two swapped channel tiles, the second masked


@pytest.mark.parametrize("case,k_loop", SWAP_CASES, ids=lambda c: c if isinstance(c, str) else f"c{c[0]}-{c[1]}_k{c[3]}s{c[4]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_swapped_operands(case, k_loop, dtype, monkeypatch):
    """A swapped tile (Y^T = W X^T, output channels on the MMA's M side) gives the forward with
    every epilogue and the prologue, against fp64; the launch really is swapped (SWAP), from a
    tile_override "swap" tile and from conv3d.SWAP_NARROW for at most 64 output channels."""
    from kernels.compile_report import capture

    monkeypatch.setattr(conv3d, "K_LOOP", k_loop)
    cout, s, p = case[1], case[4], case[5]
    x, w, b, scale, shift, res, expected = _fwd_case(case, dtype)
    with tile_override((64, 64, 32, 4, 1, "swap"), "fwd"):
        meta = capture(conv3d_forward, x.to("meta"), w.to("meta"), None, s, p)[0][3]
        assert meta["SWAP"] and meta["TAP"] == (k_loop == "tap")
        _check_fwd(case, dtype, x, w, b, scale, shift, res, expected)
    with conv3d.swap_narrow():
        assert bool(capture(conv3d_forward, x.to("meta"), w.to("meta"), None, s, p)[0][3].get("SWAP")) == (cout <= 64)
    assert not capture(conv3d_forward, x.to("meta"), w.to("meta"), None, s, p)[0][3].get("SWAP")


def test_swap_tiles_are_forward_only_and_named():
    with pytest.raises(ValueError, match="'swap' is for"):
        with tile_override(SWAP_TILES[0], "wgrad"):
            pass
    with pytest.raises(ValueError, match="'swap' is for"):
        with tile_override((64, 64, 32, 4, 1, "swapp"), "fwd"):
            pass


def test_swap_narrow_picks_its_tile_by_kind(monkeypatch):
    """The GPU choice (INTERPRET off; nothing launches): under swap_narrow, 64-channel forwards take
    SWAP_NARROW_TILES["fwd"] and dgrads ["dgrad"]; fwd_tile swaps the forward's for one block; wider
    outputs and the wgrad never swap; everything is restored on exit."""
    monkeypatch.setattr(conv3d_kernels, "INTERPRET", False)
    pick = lambda kind, n=64, chan=64: tuple(conv3d._tiles(kind, 8 * 48 * 96 * 96, n, 27 * chan, chan).values())
    plain = pick("fwd")
    with conv3d.swap_narrow():
        assert pick("fwd") == (256, 64, 32, 4, 4, True) == conv3d.SWAP_NARROW_TILES["fwd"][:5] + (True,)
        assert pick("dgrad") == (256, 64, 64, 8, 3, True) == conv3d.SWAP_NARROW_TILES["dgrad"][:5] + (True,)
        assert pick("fwd", n=128)[-1] is not True and pick("wgrad")[-1] is not True
        with conv3d.swap_narrow(fwd_tile=SWAP_TILES[1]):
            assert pick("fwd") == SWAP_TILES[1][:5] + (True,) and pick("dgrad")[:4] == (256, 64, 64, 8)
        assert pick("fwd")[3] == 4
    assert pick("fwd") == plain and plain[-1] is not True and conv3d.SWAP_NARROW_TILES["fwd"][3] == 4
    with pytest.raises(ValueError, match="fwd_tile must be a swapped tile"):
        with conv3d.swap_narrow(fwd_tile=TILE_GRID[0]):
            pass


@pytest.mark.parametrize("tile", SWAP_TILES, ids=lambda t: "x".join(map(str, t)))
def test_every_swept_swap_tile_is_correct(tile):
    """The sweep times the forward under these too: each must be right with the statistics
    epilogue, on odd sizes that leave every tile dimension partly masked."""
    cin, cout, sp, k, s, p = 6, 9, (7, 5, 6), 3, 2, 1
    x = _x(2, cin, sp, torch.float32)
    w = torch.randn(cout, cin, k, k, k, device=DEV) / (cin * k ** 3) ** 0.5
    with tile_override(tile, "fwd"):
        y, st = conv3d_forward(x, w, None, s, p, stats=True)
    ref, ref_st = reference_conv3d(x.double(), w.double(), None, s, p)
    assert _err(y, ref) < TOL[torch.float32] and _err(st, ref_st) < TOL[torch.float32]


@pytest.mark.parametrize("tile", TILE_GRID, ids=lambda t: "x".join(map(str, t)))
def test_every_swept_tile_is_correct(tile):
    """The benchmark's tile sweep may crown any of these as a default: each must be right for each
    kernel, on odd sizes that leave every tile dimension partly masked. The stats epilogue is
    included, its partials being per row tile."""
    cin, cout, sp, k, s, p = 6, 9, (7, 5, 6), 3, 2, 1
    x = _x(2, cin, sp, torch.float32).requires_grad_()
    w = (torch.randn(cout, cin, k, k, k, device=DEV) / (cin * k ** 3) ** 0.5).requires_grad_()
    with tile_override(tile):
        y, st = conv3d_forward(x.detach(), w.detach(), None, s, p, stats=True)
        yt = conv3d_triton(x, w, None, s, p)
        g = torch.randn_like(yt)
        yt.backward(g)
    xr, wr = (t.detach().double().requires_grad_() for t in (x, w))
    ref, ref_st = reference_conv3d(xr, wr, None, s, p)
    ref.backward(g.double())
    for name, a, r in [("y", y, ref), ("stats", st, ref_st), ("dx", x.grad, xr.grad), ("dw", w.grad, wr.grad)]:
        assert _err(a, r) < TOL[torch.float32], (name, _err(a, r))


def test_tile_override_names_a_kernel():
    with pytest.raises(ValueError, match="kind must be one of"):
        with tile_override(TILE_GRID[0], "forward"):
            pass


def test_training_bn_statistics_and_running_update():
    """Stats from the epilogue give the same normalisation and running statistics as BatchNorm3d."""
    from kernels.conv3d import update_running_stats

    x = _x(3, 5, (6, 6, 6), torch.float32)
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
    assert _err(got, ref) < 1e-4
    for name in ("running_mean", "running_var"):
        assert _err(getattr(bn, name), getattr(bn_ref, name)) < 1e-5, name


def test_bn_statistics_when_the_mean_dwarfs_the_std():
    """Per-channel means 300x the std (a biased convolution): E[y^2] - mean^2 in fp32 cancels
    to 4-6% error in the variance here; the row tiles' centred moments, merged by Chan's rule,
    keep it to fp32 rounding. 2970 rows: many tiles and a short last one."""
    x = _x(3, 5, (9, 10, 11), torch.float32)
    w = torch.randn(4, 5, 3, 3, 3, device=DEV) / 12
    b = 300.0 + torch.randn(4, device=DEV)
    _, st = conv3d_forward(x, w, b, 1, 1, stats=True)
    _, ref = reference_conv3d(x.double(), w.double(), b.double(), 1, 1)
    assert ref[1].min() > 0.1 and ref[0].abs().min() > 200  # the regime this test is about
    assert _err(st[0], ref[0]) < 1e-6
    assert ((st[1].double() - ref[1]).abs() / ref[1]).max() < 1e-4, (st[1], ref[1])


@pytest.mark.parametrize("c,k_loop", [(6, "flat"), (64, "tap")])
def test_inference_block_with_folded_bn(c, k_loop, monkeypatch):
    monkeypatch.setattr(conv3d, "K_LOOP", k_loop)
    x = _x(2, c, (5, 6, 7), torch.float32)
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
    assert _err(y, ref) < 1e-5


@pytest.mark.skipif(not CUDA, reason="the interpreter gets bf16 dots wrong; runs on the lent GPU")
@pytest.mark.parametrize("case", CASES + TAP_CASES[:3], ids=lambda c: f"c{c[0]}-{c[1]}_k{c[3]}s{c[4]}p{c[5]}")
@pytest.mark.parametrize("k_loop", ["flat", "tap"])
def test_cuda_bf16(case, k_loop, monkeypatch):
    monkeypatch.setattr(conv3d, "K_LOOP", k_loop)
    cin, cout, sp, k, s, p = case
    x = _x(2, cin, sp, torch.bfloat16).requires_grad_()
    w = (torch.randn(cout, cin, k, k, k, device=DEV) / (cin * k ** 3) ** 0.5).bfloat16().requires_grad_()
    y = conv3d_triton(x, w, None, s, p)
    g = torch.randn_like(y)
    y.backward(g)
    xr, wr = (t.detach().double().requires_grad_() for t in (x, w))
    yr = F.conv3d(xr, wr, None, s, p)
    yr.backward(g.double())
    for name, a, r in [("y", y, yr), ("dx", x.grad, xr.grad), ("dw", w.grad, wr.grad)]:
        assert _err(a.detach(), r.detach()) < TOL[torch.bfloat16], (name, _err(a.detach(), r.detach()))


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
    assert _err(yb, ya) < 1e-4
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g.float())
    worst = max(_err(pb.grad, pa.grad) for pa, pb in zip(ref.parameters(), tri.parameters()))
    assert worst < 1e-3, worst
    for (name, a), (_, b) in zip(ref.named_buffers(), tri.named_buffers()):
        if a.is_floating_point():
            assert _err(b, a) < 1e-4, (name, _err(b, a))
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


@pytest.mark.parametrize("case", [(5, 32, (5, 6, 7), 3, 2, 1), (3, 32, (4, 5, 6), (1, 3, 2), 1, (0, 1, 1)),
                                  (4, 32, (6, 5, 7), 2, 2, 1)], ids=["k3s2", "k132s1", "k2s2p1"])
def test_dgrad_tap_loop(case, monkeypatch):
    """The dgrad's per-tap loop (Cout a multiple of BK): strided parity classes, a non-cubic
    kernel and a padded even kernel (1 tap per class, shifted); dx against fp64, and the launch
    really takes the TAP path."""
    from kernels.compile_report import capture
    from kernels.conv3d import conv3d_dgrad

    monkeypatch.setattr(conv3d, "K_LOOP", "tap")
    cin, cout, sp, k, s, p = case
    k = k if isinstance(k, tuple) else (k,) * 3
    x = _x(2, cin, sp, torch.float32).requires_grad_()
    w = (torch.randn(cout, cin, *k, device=DEV) / (cin * k[0] * k[1] * k[2]) ** 0.5).requires_grad_()
    with tile_override((64, 64, 32, 4, 1)):
        y = conv3d_triton(x, w, None, s, p)
        g = torch.randn_like(y)
        y.backward(g)
        meta = capture(conv3d_dgrad, g.to("meta"), w.to("meta"), x.shape, conv3d._triple(s), conv3d._triple(p),
                       torch.float32)[0][3]
    assert meta["TAP"]
    xr = x.detach().double().requires_grad_()
    F.conv3d(xr, w.detach().double(), None, s, p).backward(g.double())
    assert _err(x.grad, xr.grad) < TOL[torch.float32], _err(x.grad, xr.grad)


def test_inference_folds_once_and_refolds_after_a_change():
    """conv_block_inference caches the folded GEMM-layout weight per weight tensor; an in-place
    change to the BN statistics or to the weight (an optimizer step, load_state_dict) refolds."""
    x = _x(2, 6, (4, 5, 3), torch.float32)
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
    assert _err(y1, ref()) < 1e-5
    bn.running_var.mul_(3.0)
    y3 = conv_block_inference(x, w, bn, 1, 1)
    assert w._ctvlp_folded[1] is not first and _err(y3, ref()) < 1e-5
    bn.float()
    w.mul_(-1.0)
    assert _err(conv_block_inference(x, w, bn, 1, 1), ref()) < 1e-5


@pytest.mark.parametrize("case", [(32, 5, (5, 6, 7), 3, 2, 1), (32, 3, (4, 5, 6), (1, 3, 2), 1, (0, 1, 1))],
                         ids=["k3s2", "k132s1"])
def test_wgrad_tap_loop(case, monkeypatch):
    """The wgrad's tap form (Cin a multiple of BN: a program's columns lie in one tap), plain and
    with the BN-ReLU prologue on X; dW against fp64, and the launch takes the TAP path."""
    from kernels.compile_report import capture
    from kernels.conv3d import conv3d_wgrad

    monkeypatch.setattr(conv3d, "K_LOOP", "tap")
    cin, cout, sp, k, s, p = case
    k = k if isinstance(k, tuple) else (k,) * 3
    x = _x(2, cin, sp, torch.float32)
    w_shape = (cout, cin, *k)
    scale, shift = torch.rand(cin, device=DEV) + 0.5, torch.randn(cin, device=DEV)
    for prologue in (False, True):
        xin = torch.relu(x.double() * scale.double().view(1, -1, 1, 1, 1) + shift.double().view(1, -1, 1, 1, 1)) \
            if prologue else x.double()
        wr = torch.zeros(w_shape, dtype=torch.float64, device=DEV, requires_grad=True)
        yr = F.conv3d(xin, wr, None, s, p)
        g = torch.randn_like(yr)
        yr.backward(g)
        dy = g.float().contiguous(memory_format=torch.channels_last_3d)
        kw = dict(in_scale=scale, in_shift=shift) if prologue else {}
        with tile_override((32, 32, 32, 4, 1), "wgrad"):
            dw = conv3d_wgrad(x, dy, w_shape, conv3d._triple(s), conv3d._triple(p), torch.float32, **kw)
            meta = capture(conv3d_wgrad, x.to("meta"), dy.to("meta"), w_shape, conv3d._triple(s), conv3d._triple(p),
                           torch.float32, **kw)[0][3]
        assert meta["TAP"]
        assert _err(dw, wr.grad) < TOL[torch.float32], (prologue, _err(dw, wr.grad))
