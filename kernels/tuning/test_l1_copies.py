"""l1_copies: compiled for sm_90a (in a subprocess: these tests interpret the kernels), the conv
forward with its activation copies marked .ca, and the loss forward under tile flag 8, come out
with L1-allocating 16-byte copies (LDGSTS without BYPASS) and the same registers and
instructions per loop iteration; unmarked kernels are left as Triton makes them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.tuning.l1_copies import rewrite_ptx

ROOT = Path(__file__).resolve().parents[2]

CODE = r"""
import json, re, subprocess, tempfile, os
import torch, triton
import triton.backends.nvidia as nv
from triton.backends.compiler import GPUTarget
from kernels.tuning.compile_report import signature, capture, loss_forward_launches, report
from kernels.tuning.conv3d_variants import ConvVariant
from kernels.conv3d import conv3d_forward

def compiled(launch):
    kernel, grid, args, meta = launch
    opts = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
    k = triton.compile(signature(kernel, args, {k: v for k, v in meta.items() if k not in opts}),
                       target=GPUTarget("cuda", 90, 128), options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        sass = subprocess.run([os.path.join(os.path.dirname(nv.__file__), "bin", "nvdisasm"), "-c", f.name],
                              capture_output=True, text=True).stdout
    r = report(*launch)
    return {"ca": k.asm["ptx"].count("cp.async.ca.shared.global"), "cg": k.asm["ptx"].count("cp.async.cg.shared.global"),
            "ldgsts": sorted(set(re.findall(r"LDGSTS[.\w]*", sass))), "registers": r["registers"],
            "instructions": r["loop_sass_instructions"]}

x = torch.empty(8, 64, 48, 96, 96, dtype=torch.bfloat16, device="meta").contiguous(memory_format=torch.channels_last_3d)
w = torch.empty(64, 64, 3, 3, 3, dtype=torch.bfloat16, device="meta")
out = {}
for l1 in (False, True, False):  # the plain kernel again after the hook is installed
    v = ConvVariant("tap", act_l1=l1, tiles={"fwd": (512, 64, 32, 8, 3, "swap")})
    with v.active():
        launch = capture(conv3d_forward, x, w, None, 1, 1, relu=True, residual=x, tiles=v.rule)[0]
    out.setdefault("plain" if not l1 else "l1", []).append(compiled(launch))
out["loss"] = compiled(loss_forward_launches(65536, 512, "64,128,64,128,4,3")["forward"])
out["loss_l1"] = compiled(loss_forward_launches(65536, 512, "64,128,64,128,4,3,8")["forward"])  # flag 8
print(json.dumps(out))
"""


@pytest.mark.compiler
def test_marked_forward_copies_allocate_in_l1_on_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    (l1,), plain = out["l1"], out["plain"]
    for p in plain + [out["loss"]]:  # untouched: every 16-byte copy bypasses L1
        assert p["ca"] == 0 and p["cg"] > 0 and p["ldgsts"] == ["LDGSTS.E.BYPASS.128"], p
    assert l1["cg"] == 0 and l1["ca"] == plain[0]["cg"] and l1["ldgsts"] == ["LDGSTS.E.128"], l1
    assert (l1["registers"], l1["instructions"]) == (plain[0]["registers"], plain[0]["instructions"])
    loss, loss_l1 = out["loss"], out["loss_l1"]  # the loss forward's flag 8, likewise
    assert loss_l1["cg"] == 0 and loss_l1["ca"] == loss["cg"] and loss_l1["ldgsts"] == ["LDGSTS.E.128"], loss_l1
    assert (loss_l1["registers"], loss_l1["instructions"]) == (loss["registers"], loss["instructions"])


def test_rewrite_changes_only_the_async_copies_cache_operator():
    ptx = ("cp.async.cg.shared.global [ %r1 + 0 ], [ %rd2 + 0 ], 0x10, %r3;\n"
           "ld.global.cg.v4.b32 { %r4, %r5, %r6, %r7 }, [ %rd8 + 0 ];\n")
    assert rewrite_ptx(ptx) == ptx.replace("cp.async.cg.", "cp.async.ca.", 1)
