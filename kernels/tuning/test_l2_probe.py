"""The L2 probe reads what it claims: its per-program sums equal the torch reference (fp64), and
its launches bypass L1 (ld.global.cg) when compiled for sm_90a."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.tuning.l2_probe import BLOCK, l2_read, l2_read_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("n_blocks,reads,programs", [(5, 7, 3), (4, 3, 8), (1, 2, 2)])
def test_l2_read_sums_the_blocks_it_claims(n_blocks, reads, programs):
    x = torch.randn(n_blocks * BLOCK, device=DEV)
    got = l2_read(x, reads, programs).double()
    ref = l2_read_reference(x, reads, programs)
    torch.testing.assert_close(got.cpu(), ref.cpu(), rtol=1e-5, atol=1e-3)
    if n_blocks > 1 and programs > 1:  # programs start at different blocks: their sums differ
        assert got.unique().numel() > 1


def test_l2_read_rejects_a_ragged_buffer():
    with pytest.raises(ValueError, match="multiple of 4096"):
        l2_read(torch.zeros(BLOCK + 1, device=DEV), 1, 1)


@pytest.mark.compiler
def test_l2_read_bypasses_l1_on_sm90():
    """Compiled for sm_90a (in a subprocess: these tests interpret the kernels), every load of x
    is a 16-byte ld.global.cg: through L2, not allocated in L1, so the probe measures L2."""
    code = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.tuning import l2_probe
sig = {"X": "*bf16", "OUT": "*fp32", "n_blocks": "i32", "reads": "i32", "programs": "i32", "BLOCK": "constexpr"}
src = ASTSource(fn=l2_probe._l2_read, signature=sig, constexprs={"BLOCK": l2_probe.BLOCK},
                attrs={(0,): [["tt.divisibility", 16]]})
print(triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": 4}).asm["ptx"])
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    loads = [ln.strip() for ln in r.stdout.splitlines() if "ld.global" in ln]
    assert loads and all("ld.global.cg.v4" in ln for ln in loads), loads[:4]
