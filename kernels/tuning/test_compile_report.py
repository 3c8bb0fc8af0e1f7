"""The kernels as the compiler builds them for an H100 (sm_90a), on any machine: Triton's wheel
carries ptxas, so no GPU is needed. Runs in a subprocess, because these tests interpret the
kernels (TRITON_INTERPRET=1) and a report needs them compiled. They pin one compiler version's
registers, spills, instructions and shared memory, so they are opt-in (marker `compiler`):
`make preflight` runs them, `make test` does not."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.compiler


def _reports(launches_call: str) -> dict:
    """{name: report} for the launches that `launches_call` (an expression) returns."""
    code = ("import json\nfrom kernels.tuning.compile_report import *\nfrom kernels.tuning.conv3d_variants import ConvVariant\n"
            "from kernels.tuning.panel import PanelConfig\n"
            f"print(json.dumps({{k: report(*v) for k, v in {launches_call}.items()}}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("layer", [(64, 64, (48, 96, 96), 1), (64, 128, (48, 96, 96), 2)], ids=["layer1", "layer2.0"])
def test_block_gemm_tiles_are_pipelined_async_copies_on_sm90(layer):
    """The fused block's GEMM launches at the seed tower's shapes, default tiles: wgmma drives the
    tensor cores, every operand tile inside the K loop is an async copy (pipelined over
    num_stages), none is a synchronous load, nothing spills. With the torch weight layout
    [Cout, Cin, kd, kh, kw], the forward's and dgrad's weight tiles were synchronous scalar loads."""
    cin, cout, sp, s = layer
    rows = _reports(f"conv_block_launches({cin}, {cout}, {sp}, 8, stride={s})")
    assert set(rows) == {"fwd+stats", "dgrad+relu_bn", "dgrad+residual", "wgrad"}
    for name, row in rows.items():
        assert row["wgmma"] > 0 and row["mma_sync"] == 0, (name, row)
        assert row["loop_sync_tile_loads"] == 0 and row["loop_async_loads"] >= 2, (name, row)
        assert row["shared_bytes"] <= 227 * 1024 and row["spill_store_bytes"] == 0, (name, row)


def test_contrastive_backward_passes_compile_without_transposed_register_tiles():
    """The loss backward at b = 65,536, d = 512, bf16, default tile (the issue's 50%-of-matmul
    point): both passes on wgmma, operand tiles async. The column pass forms G^T from S^T = T I^T
    rather than transposing G in registers, which spilled 544 bytes per thread; the row pass's
    whole-d accumulator (64 x 512 fp32) leaves it at the register limit with a small spill."""
    rows = _reports("loss_backward_launches(65536, 512)")
    for name, row in rows.items():
        assert row["wgmma"] > 0 and row["mma_sync"] == 0 and row["loop_sync_tile_loads"] == 0, (name, row)
    assert rows["cols (dT)"]["spill_store_bytes"] == 0, rows["cols (dT)"]
    assert rows["rows (dI)"]["spill_store_bytes"] <= 64, rows["rows (dI)"]  # measured: 36


def test_contrastive_forward_one_row_block_flattens_its_loops():
    """The loss forward at b = 65,536, d = 512, bf16: under flag bit 2 (a program per row block)
    the column loop and its K loop compile to one loop around the MMA, where the default's K loop
    restarts inside the row and column loops (depth 3), so the next tile's loads wait for each
    tile's softmax epilogue. Operand tiles stay async copies; no spill at these tiles."""
    for tiles in ("128,64,64,128,4,3", "128,128,64,128,8,3"):
        base = _reports(f"loss_forward_launches(65536, 512, {tiles!r})")["forward"]
        flat = _reports(f"loss_forward_launches(65536, 512, {tiles + ',2'!r})")["forward"]
        assert base["dot_loop_depth"] == 3 and flat["dot_loop_depth"] == 1, (base, flat)
        assert flat["grid"][0] == 65536 // flat["BM"] and base["grid"][0] == 2 * 132, (base, flat)
        for row in (base, flat):
            assert row["wgmma"] > 0 and row["loop_sync_tile_loads"] == 0 and row["spill_store_bytes"] == 0, row


def test_contrastive_forward_register_cap_fits_two_programs_per_sm():
    """An eighth tile number caps ptxas's registers per thread (maxnreg). The flattened 64 x 128
    forward with 8 warps uses 182 registers (141 with TMA), so one program fills an SM's 64K;
    capped at 128 it compiles with no spill and the same MMAs, and two programs (with their
    shared memory) fit an SM, one's softmax epilogue beside the other's MMAs."""
    for flag in (2, 6):
        free = _reports(f"loss_forward_launches(65536, 512, '64,128,64,128,8,3,{flag}')")["forward"]
        cap = _reports(f"loss_forward_launches(65536, 512, '64,128,64,128,8,3,{flag},128')")["forward"]
        assert free["registers"] * 256 * 2 > 65536 >= cap["registers"] * 256 * 2, (free, cap)
        assert cap["maxnreg"] == 128 and cap["spill_store_bytes"] == cap["loop_local_memory"] == 0, cap
        assert cap["dot_loop_depth"] == 1, cap
        assert cap["loop_sass_mma"] == free["loop_sass_mma"], (free, cap)
        assert cap["loop_sass_instructions"] <= 1.05 * free["loop_sass_instructions"], (free, cap)
        assert (cap["shared_bytes"] + 1024) * 2 <= 228 * 1024, cap


def test_panel_grad_tile_register_cap_spills_outside_its_k_loop():
    """The panel's 128 x 128 G tile (TMA) needs 235 registers, one 8-warp program per SM; its
    seventh number caps them at 128: two programs fit, and the spill lands in the epilogue (no
    local-memory access in the K loop, about the same instructions per K step)."""
    g = {}
    for cap in ("", ",128"):
        g[cap] = _reports(f"loss_panel_launches(65536, 512, PanelConfig('128,128,64,8,3,1{cap}', '128,128,64,8,3'))")[
            "G tile"]
    free, cap = g[""], g[",128"]
    assert free["registers"] * 256 * 2 > 65536 >= cap["registers"] * 256 * 2, (free, cap)
    assert cap["spill_store_bytes"] > 0 and cap["loop_local_memory"] == free["loop_local_memory"] == 0, cap
    assert cap["loop_sass_instructions"] <= 1.05 * free["loop_sass_instructions"], (free, cap)
    assert (cap["shared_bytes"] + 1024) * 2 <= 228 * 1024, cap


def test_contrastive_tma_loads_free_registers_and_issue_slots():
    """Flag bit 4 (forward, FULL backward) and the G tile's sixth number (panel): operand blocks
    come through the copy engine (TMA), not as per-thread async copies. The default forward tile
    (64 x 128, 4 warps) drops from 255 registers to a count that lets three programs share an SM
    (64K registers, 228 KB); the G tile's K step and the backward passes' column step issue fewer
    instructions for the same MMAs, and the dI pass no longer spills."""
    base = _reports("loss_forward_launches(65536, 512, '64,128,64,128,4,3')")["forward"]
    tma = _reports("loss_forward_launches(65536, 512, '64,128,64,128,4,3,4')")["forward"]
    assert base["loop_async_loads"] > 0 and base["loop_tma_loads"] == 0, base
    assert tma["loop_tma_loads"] > 0 and tma["loop_async_loads"] == 0 and tma["spill_store_bytes"] == 0, tma
    assert tma["registers"] * 128 * 3 <= 65536 < base["registers"] * 128 * 3, (base, tma)
    assert (tma["shared_bytes"] + 1024) * 3 <= 228 * 1024, tma
    g = {}
    for flag in ("", ",1"):
        g[flag] = _reports(f"loss_panel_launches(65536, 512, PanelConfig('128,64,64,8,3{flag}', '128,128,64,8,3'))")[
            "G tile"]
    assert g[",1"]["loop_tma_loads"] == 2 and g[",1"]["loop_async_loads"] == 0, g
    assert g[",1"]["loop_sass_instructions"] < g[""]["loop_sass_instructions"], g
    assert g[",1"]["loop_sass_mma"] == g[""]["loop_sass_mma"] and g[",1"]["spill_store_bytes"] == 0, g
    bwd = {}
    for flag in (1, 5):  # the two-pass backward's default FULL tile, then with TMA: the dI pass's spill goes
        bwd[flag] = _reports(f"loss_backward_launches(65536, 512, '64,64,64,512,8,2,{flag}')")
    for name in ("rows (dI)", "cols (dT)"):
        plain, tma = bwd[1][name], bwd[5][name]
        assert tma["loop_tma_loads"] > 0, (name, tma)
        assert tma["loop_sass_instructions"] < plain["loop_sass_instructions"], (name, plain, tma)
    # Triton 3.7.1: dI spills 36 B plain, nothing with TMA; 3.6.0 (the GPU image's): dI 64 B plain,
    # 0 with TMA, while dT goes from 0 to 28 B; either way TMA spills less in all
    spill = {f: sum(r["spill_store_bytes"] for r in bwd[f].values()) for f in bwd}
    assert bwd[1]["rows (dI)"]["spill_store_bytes"] > 0 == bwd[5]["rows (dI)"]["spill_store_bytes"], bwd
    assert spill[5] < spill[1], spill


def test_contrastive_panel_backward_compiles_to_two_programs_per_sm():
    """The panel backward's kernels at b = 65,536, d = 512, bf16, default tiles: wgmma, async
    operand tiles, no spills, and registers and shared memory that let two programs share an SM
    (64K registers and 228 KB per SM), so one program's exponentials overlap the other's MMA."""
    rows = _reports("loss_panel_launches(65536, 512)")
    assert set(rows) == {"G tile", "dI = G T", "dT += G^T I"}
    for name, row in rows.items():
        assert row["wgmma"] > 0 and row["mma_sync"] == 0 and row["loop_sync_tile_loads"] == 0, (name, row)
        assert row["spill_store_bytes"] == 0, (name, row)
        assert row["registers"] * 32 * row["num_warps"] * 2 <= 65536, (name, row)
        assert row["shared_bytes"] * 2 <= 228 * 1024, (name, row)


def test_signature_makes_constexpr_parameters_constants():
    """Triton's JIT makes every constexpr parameter a constant, however it is passed; a report that
    compiled the kernel size or stride (passed positionally) as runtime ints counted the SASS of a
    different kernel (the flat loop's 413 instructions per K step of 2026-11-23 were 349)."""
    code = ("import json\nfrom kernels.tuning.compile_report import signature, conv_block_launches\n"
            "k, _, a, m = conv_block_launches(64, 64, (8, 8, 8), 2)['fwd+stats']\n"
            "print(json.dumps(signature(k, a, m).signature))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the JIT's kernel objects
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sig = json.loads(r.stdout.splitlines()[-1])
    assert all(sig[n] == "constexpr" for n in ("KD", "KH", "KW", "SD", "SH", "SW", "BM")), sig
    assert sig["Cin"] == "i32" and sig["X"] == "*bf16"


def test_tap_k_loop_issues_fewer_instructions_per_mma_on_sm90():
    """layer1's forward and dgrads with the flat and the tap K loop, compiled for sm_90a: the
    SASS main loop keeps its MMAs and async operand copies, and the tap loop issues at most 60%
    as many instructions per iteration (2026-11-23, with per-row tap bits: 349 -> 179 forward,
    280/284 -> 135/141 dgrad; at 128 x 64 x 64 one iteration's MMAs take about 256 cycles, so 349
    issued instructions per warp made the flat loop issue-bound)."""
    rows = {loop: _reports(f"conv_block_launches(64, 64, (48, 96, 96), 8, variant=ConvVariant({loop!r}))")
            for loop in ("flat", "tap")}
    for name in ("fwd+stats", "dgrad+relu_bn", "dgrad+residual"):
        flat, tap = rows["flat"][name], rows["tap"][name]
        assert tap["loop_sass_mma"] == flat["loop_sass_mma"] > 0, (name, flat, tap)
        assert tap["loop_async_loads"] == flat["loop_async_loads"] and tap["spill_store_bytes"] == 0, (name, tap)
        assert tap["loop_sass_instructions"] <= 0.6 * flat["loop_sass_instructions"], (name, flat, tap)


def test_swapped_tiles_lift_the_shared_memory_cap_on_sm90():
    """layer1's forward (64 output channels) compiled for sm_90a. Default tile 128 x 64 x 64, 4
    warps: per warp and K step the async copies write (128 + 64) x 64 x 2 / 4 = 6,144 bytes and
    8 m64n64k16 MMAs read 8 x (64 + 64) x 16 x 2 / 4 = 8,192, against 2 x 128 x 64 x 64 / 4 FLOPs:
    256 MMA cycles per 448 shared-memory cycles, a cap of 0.571. Swapped (ConvVariant(swap=True):
    256 x 64 x 32, one warpgroup) the MMAs are m64n256k16 and each operand is read once: per warp
    and K step (256 + 64) x 32 x 2 / 4 = 5,120 bytes written and 2 x (64 + 256) x 16 x 2 / 4 = 5,120
    read, against 256 MMA cycles: cap 0.8, with no spill and the tap loop's instruction count.
    The 8-warp 256 x 64 x 64 (m64n128) reaches 0.727. The dgrads (64 input channels, 8 warps) go
    0.571 -> 0.727, and the one with the ReLU/BN epilogue drops from the register limit's edge
    (246) to under 200."""
    both = {swap: _reports(f"conv_block_launches(64, 64, (48, 96, 96), 8, variant=ConvVariant('tap', swap={swap}))")
            for swap in (False, True)}
    for name in ("dgrad+relu_bn", "dgrad+residual"):
        plain, swapped = both[False][name], both[True][name]
        assert plain["smem_cap"] == 0.571 and swapped["smem_cap"] == 0.727, (name, plain, swapped)
        assert swapped["spill_store_bytes"] == 0 and swapped["registers"] < 200, (name, swapped)
    plain, swapped = both[False]["fwd+stats"], both[True]["fwd+stats"]
    assert (plain["loop_smem_write_bytes_per_warp"], plain["loop_smem_read_bytes_per_warp"]) == (6144, 8192), plain
    assert plain["loop_mma_flops_per_warp"] == 2 * 128 * 64 * 64 // 4 and plain["smem_cap"] == 0.571, plain
    assert (swapped["BM"], swapped["BK"], swapped["num_warps"], swapped["loop_sass_mma"]) == (256, 32, 4, 2), swapped
    assert (swapped["loop_smem_write_bytes_per_warp"], swapped["loop_smem_read_bytes_per_warp"]) == (5120, 5120), swapped
    assert swapped["smem_cap"] == 0.8 and swapped["spill_store_bytes"] == 0 and swapped["registers"] <= 232, swapped
    assert swapped["loop_async_loads"] >= 2 and swapped["loop_sass_instructions"] <= plain["loop_sass_instructions"]
