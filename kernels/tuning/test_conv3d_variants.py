"""The untimed convolution variants (conv3d_variants.py) against fp64 torch: the tap K loops,
swapped operands, the L1 mark and the sweep's tiles, each through the production launchers and
blocks running under a ConvVariant, and each launch checked to have run the variant it names.
CPU: the interpreter (fp32, fp16); GPU: bf16 too (the GPU script's pytest_new phase)."""
import os

import pytest
import torch
import torch.nn.functional as F

from kernels.conv3d import conv3d_dgrad, conv3d_forward, conv3d_triton, conv3d_wgrad, conv_block_inference
from kernels.conv3d_ref import reference_conv3d
from kernels.test_conv3d import DEV, TOL, check_bf16, make_x, rel_err
from kernels.tuning.compile_report import capture, trace_launches
from kernels.tuning.conv3d_variants import SWAP_TILES, TILE_GRID, ConvVariant, is_swapped

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

# channel counts that are multiples of the K tile (BK 32 here): the tap K loop applies
TAP_CASES = [(32, 9, (3, 4, 5), 3, 2, 1), (64, 5, (4, 3, 5), 3, 1, 1), (32, 7, (3, 5, 4), 1, 2, 0),
             (32, 4, (3, 5, 6), (1, 3, 2), 1, (0, 1, 1))]  # a non-cubic kernel: kd, kh, kw decoded apart
ids = lambda c: f"c{c[0]}-{c[1]}_k{c[3]}s{c[4]}p{c[5]}"  # noqa: E731


def _triple(v):
    return tuple(v) if isinstance(v, tuple) else (v,) * 3


def _fwd_case(case, dtype):
    """Inputs of a forward with every epilogue and its fp64 reference."""
    cin, cout, sp, k, s, p = case
    k = _triple(k)
    x = make_x(2, cin, sp, dtype)
    w = (torch.randn(cout, cin, *k, device=DEV) / (cin * k[0] * k[1] * k[2]) ** 0.5).to(dtype)
    b = torch.randn(cout, device=DEV)
    ref, ref_st = reference_conv3d(x.double(), w.double(), b.double(), s, p)
    res = torch.randn_like(ref).to(dtype)
    return x, w, b, res, (torch.relu(ref + res.double()), ref_st)


def _traced(fn):
    """fn()'s result and its kernel launches."""
    res = []
    launches = trace_launches(lambda: res.append(fn()))
    return res[0], launches


def _fwd(case, dtype, v: ConvVariant):
    """The forward with every epilogue under v, against fp64; returns its launch's kernel name and meta."""
    x, w, b, res, (want, want_st) = _fwd_case(case, dtype)
    with v.active():
        (y, st), [(kernel, _, _, meta)] = _traced(
            lambda: conv3d_forward(x, w, b, case[4], case[5], residual=res, relu=True, stats=True, tiles=v.rule))
    assert rel_err(y, want) < TOL[dtype] and rel_err(st, want_st) < TOL[dtype] * 10
    return kernel.__name__, meta


@pytest.mark.parametrize("case", TAP_CASES, ids=ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_tap_loop(case, dtype):
    name, meta = _fwd(case, dtype, ConvVariant("tap", tiles={"fwd": (64, 64, 32, 4, 1)}))
    assert name == "conv_fwd_variant" and meta["TAP"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_with_activations_through_l1(dtype):
    """act_l1 marks the tap loop's activation loads .ca (l1_copies.py), swapped or not; the flat
    loop (Cin no multiple of BK) takes no mark; same results against fp64."""
    for tile in ((64, 64, 32, 4, 1), (64, 64, 32, 4, 1, "swap")):
        _, meta = _fwd(TAP_CASES[1], dtype, ConvVariant("tap", act_l1=True, tiles={"fwd": tile}))
        assert meta["ACT_CACHE"] == ".ca" and meta.get("SWAP", False) == is_swapped(tile)
    _, meta = _fwd((5, 7, (5, 6, 7), 3, 1, 1), dtype, ConvVariant("tap", act_l1=True))
    assert not meta["TAP"] and "ACT_CACHE" not in meta


SWAP_CASES = [((5, 7, (5, 6, 7), 3, 1, 1), "flat"), ((1, 6, (9, 8, 11), 7, 2, 3), "flat"),
              ((64, 5, (4, 3, 5), 3, 1, 1), "tap"),
              ((32, 70, (3, 5, 4), 3, 2, 1), "tap")]  # 70 channels: two swapped channel tiles, the second masked


@pytest.mark.parametrize("case,k_loop", SWAP_CASES, ids=lambda c: c if isinstance(c, str) else ids(c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_swapped_operands(case, k_loop, dtype):
    """A swapped tile (Y^T = W X^T) gives the forward with every epilogue, from a fixed "swap"
    tile and from swap=True for at most 64 output channels."""
    _, meta = _fwd(case, dtype, ConvVariant(k_loop, tiles={"fwd": (64, 64, 32, 4, 1, "swap")}))
    assert meta["SWAP"] and meta["TAP"] == (k_loop == "tap")
    _, meta = _fwd(case, dtype, ConvVariant(k_loop, swap=True))
    assert meta.get("SWAP", False) == (case[1] <= 64)


def test_variants_reject_what_they_cannot_run():
    with pytest.raises(ValueError, match="only fwd/dgrad swap"):
        ConvVariant(tiles={"wgrad": SWAP_TILES[0]})
    with pytest.raises(ValueError, match="must be fwd, dgrad or wgrad"):
        ConvVariant(tiles={"forward": TILE_GRID[0]})
    with pytest.raises(ValueError, match="must be swapped"):
        ConvVariant(swap=TILE_GRID[0])
    with pytest.raises(ValueError, match="flat or tap"):
        ConvVariant("taps")


def test_swap_picks_its_tile_by_kind(monkeypatch):
    """The GPU choice (INTERPRET off; nothing launches): swap=True gives 64-channel forwards
    SWAP_NARROW_TILES["fwd"] and dgrads ["dgrad"]; a tuple swaps the forward's for that tile;
    wider outputs and the wgrad never swap."""
    from kernels import conv3d_triton

    from kernels.tuning.conv3d_variants import SWAP_NARROW_TILES

    monkeypatch.setattr(conv3d_triton, "INTERPRET", False)
    pick = lambda v, kind, n=64, chan=64: tuple(v.rule(kind, 8 * 48 * 96 * 96, n, 27 * chan, chan).values())  # noqa
    on = ConvVariant(swap=True)
    assert pick(on, "fwd") == SWAP_NARROW_TILES["fwd"][:5] + (True,)
    assert pick(on, "dgrad") == SWAP_NARROW_TILES["dgrad"][:5] + (True,)
    assert "SWAP" not in on.rule("fwd", 1000, 128, 27 * 64, 64) and "SWAP" not in on.rule("wgrad", 64, 64 * 27, 1000)
    assert pick(ConvVariant(swap=SWAP_TILES[1]), "fwd") == SWAP_TILES[1][:5] + (True,)


@pytest.mark.parametrize("tile", SWAP_TILES, ids=lambda t: "x".join(map(str, t)))
def test_every_swept_swap_tile_is_correct(tile):
    """The sweep times the forward under these: each must be right with the statistics epilogue,
    on odd sizes that leave every tile dimension partly masked."""
    _fwd((6, 9, (7, 5, 6), 3, 2, 1), torch.float32, ConvVariant(tiles={"fwd": tile}))


@pytest.mark.parametrize("tile", TILE_GRID, ids=lambda t: "x".join(map(str, t)))
def test_every_swept_tile_is_correct(tile):
    """The sweep may crown any of these as a default: each must be right for each kernel."""
    v = ConvVariant(tiles=dict.fromkeys(("fwd", "dgrad", "wgrad"), tile))
    cin, cout, sp, k, s, p = 6, 9, (7, 5, 6), 3, 2, 1
    x = make_x(2, cin, sp, torch.float32).requires_grad_()
    w = (torch.randn(cout, cin, k, k, k, device=DEV) / (cin * k ** 3) ** 0.5).requires_grad_()
    with v.active():
        yt = conv3d_triton(x, w, None, s, p, tiles=v.rule)
        g = torch.randn_like(yt)
        yt.backward(g)
    xr, wr = (t.detach().double().requires_grad_() for t in (x, w))
    F.conv3d(xr, wr, None, s, p).backward(g.double())
    for name, a, r in [("dx", x.grad, xr.grad), ("dw", w.grad, wr.grad)]:
        assert rel_err(a, r) < TOL[torch.float32], (name, rel_err(a, r))


@pytest.mark.parametrize("case", [(5, 32, (5, 6, 7), 3, 2, 1), (3, 32, (4, 5, 6), (1, 3, 2), 1, (0, 1, 1)),
                                  (4, 32, (6, 5, 7), 2, 2, 1)], ids=["k3s2", "k132s1", "k2s2p1"])
def test_dgrad_tap_loop(case):
    """The dgrad's tap loop (Cout a multiple of BK): strided parity classes, a non-cubic kernel and
    a padded even kernel (1 tap per class, shifted); dx against fp64, and the launch is TAP."""
    v = ConvVariant("tap", tiles=dict.fromkeys(("fwd", "dgrad", "wgrad"), (64, 64, 32, 4, 1)))
    cin, cout, sp, k, s, p = case
    k = _triple(k)
    x = make_x(2, cin, sp, torch.float32).requires_grad_()
    w = (torch.randn(cout, cin, *k, device=DEV) / (cin * k[0] * k[1] * k[2]) ** 0.5).requires_grad_()
    with v.active():
        y = conv3d_triton(x, w, None, s, p, tiles=v.rule)
        g = torch.randn_like(y)
        launched = trace_launches(lambda: y.backward(g))
    assert any(m.get("TAP") for kern, _, _, m in launched if kern.__name__ == "conv_dgrad_variant")
    xr = x.detach().double().requires_grad_()
    F.conv3d(xr, w.detach().double(), None, s, p).backward(g.double())
    assert rel_err(x.grad, xr.grad) < TOL[torch.float32], rel_err(x.grad, xr.grad)


@pytest.mark.parametrize("case", [(32, 5, (5, 6, 7), 3, 2, 1), (32, 3, (4, 5, 6), (1, 3, 2), 1, (0, 1, 1))],
                         ids=["k3s2", "k132s1"])
def test_wgrad_tap_loop(case):
    """The wgrad's tap form (Cin a multiple of BN: a program's columns lie in one tap); dW
    against fp64, and the launch takes the TAP path."""
    v = ConvVariant("tap", tiles={"wgrad": (32, 32, 32, 4, 1)})
    cin, cout, sp, k, s, p = case
    w_shape = (cout, cin, *_triple(k))
    x = make_x(2, cin, sp, torch.float32)
    wr = torch.zeros(w_shape, dtype=torch.float64, device=DEV, requires_grad=True)
    yr = F.conv3d(x.double(), wr, None, s, p)
    g = torch.randn_like(yr)
    yr.backward(g)
    dy = g.float().contiguous(memory_format=torch.channels_last_3d)
    with v.active():
        dw, [(_, _, _, meta)] = _traced(lambda: conv3d_wgrad(x, dy, w_shape, _triple(s), _triple(p), torch.float32,
                                                             tiles=v.rule))
    assert meta["TAP"]
    assert rel_err(dw, wr.grad) < TOL[torch.float32]


def test_inference_block_with_folded_bn_under_the_tap_loop():
    v = ConvVariant("tap")
    x = make_x(2, 64, (5, 6, 7), torch.float32)
    w = torch.randn(6, 64, 3, 3, 3, device=DEV) / (64 * 27) ** 0.5
    bn = torch.nn.BatchNorm3d(6).to(DEV).eval()
    bn.running_var.uniform_(0.5, 2.0)
    res = torch.randn(2, 6, 5, 6, 7, device=DEV)
    with v.active():
        y, launches = _traced(lambda: conv_block_inference(x, w, bn, 1, 1, residual=res, relu=True, tiles=v.rule))
    with torch.no_grad():
        ref = torch.relu(bn.double()(F.conv3d(x.double(), w.double(), None, 1, 1)) + res.double())
    assert launches[-1][3]["TAP"] and rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("case", [(16, 16, 1, (4, 5, 3)), (16, 32, 2, (5, 4, 6))], ids=["c16-16s1", "c16-32s2"])
@pytest.mark.parametrize("k_loop,swap", [("tap", False), ("flat", True), ("tap", True)])
def test_training_block_under_a_variant(case, k_loop, swap):
    """The fused block with the tap K loops and/or swapped forward and dgrad tiles: the forward's
    statistics, the dgrad's residual and ReLU/BN reductions, strided parity classes; fp32
    against fp64, and the launches really took the variant."""
    from kernels.conv3d_block import fused_basic_block
    from kernels.test_conv3d_block import compare_to_torch, make_block, randomised_pair

    base = (32, 16, 16, 4, 1)
    sw = base + ("swap",) if swap else base
    v = ConvVariant(k_loop, tiles={"fwd": sw, "dgrad": sw, "wgrad": base})
    cin, cout, s, sp = case
    ref, dut = randomised_pair(make_block(cin, cout, s), torch.float32)
    x = torch.randn(2, cin, *sp, device=DEV, dtype=torch.float64)
    with v.active():
        launched = trace_launches(lambda: compare_to_torch(ref, dut, ref, lambda t: fused_basic_block(dut, t, tiles=v.rule), x,
                                                   torch.float32))
    gemms = [m for kern, _, _, m in launched if kern.__name__.endswith("_variant")]
    assert len(gemms) >= 6 and all(m["TAP"] == (k_loop == "tap") for m in gemms)
    assert all(m.get("SWAP", False) == swap for kern, _, _, m in launched if kern.__name__ in ("conv_fwd_variant",
                                                                                                 "conv_dgrad_variant"))


@pytest.mark.skipif(not CUDA, reason="the interpreter gets bf16 dots wrong; runs on the lent GPU")
@pytest.mark.parametrize("case", TAP_CASES[:3] + [(5, 7, (5, 6, 7), 3, 1, 1)], ids=ids)
@pytest.mark.parametrize("v", [ConvVariant("tap"), ConvVariant("tap", swap=True), ConvVariant("tap", swap=True,
                                                                                               act_l1=True)],
                         ids=["tap", "tap-swap", "tap-swap-l1"])
def test_cuda_bf16_variants(case, v):
    check_bf16(case, v.rule, v.active)


def test_capture_of_a_variant_launch_needs_no_memory():
    """compile_report's capture works through a variant (meta tensors): what bench_conv's ptx part
    compiles for sm_90a."""
    x = torch.empty(2, 64, 6, 6, 6, device="meta").contiguous(memory_format=torch.channels_last_3d)
    w = torch.empty(64, 64, 3, 3, 3, device="meta")
    v = ConvVariant("tap", swap=True)
    with v.active():
        (kernel, _, _, meta), = capture(conv3d_forward, x, w, None, 1, 1, stats=True, tiles=v.rule)
        (dk, _, _, dmeta), = capture(conv3d_dgrad, x, w, x.shape, (1,) * 3, (1,) * 3, torch.float32, tiles=v.rule)
    assert kernel.__name__ == "conv_fwd_variant" and meta["TAP"] and meta["SWAP"]
    assert dk.__name__ == "conv_dgrad_variant" and dmeta["TAP"] and dmeta["SWAP"]
