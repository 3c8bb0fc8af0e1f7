"""What the compiler makes of a kernel for a GPU we do not have: Triton compiles for sm_90a on
any machine (its wheel carries ptxas), so how each tile is loaded, whether the tensor cores are
driven by wgmma, and the registers, spills and shared memory can be read without a device.

    launches = capture(conv3d_forward, x_meta, w_meta, ...)   # meta tensors: no memory, no GPU
    report(*launches[0])  -> {"wgmma": 8, "loop_async_loads": 6, "loop_sync_tile_loads": 0, ...}

A synchronous 2-D load inside the GEMM loop means the tensor cores wait on scalar loads every
step (the torch weight layout did this to the forward and dgrad); an async copy is pipelined
over num_stages. Static facts, not speed: the speed is for the GPU benchmark to measure.
Needs a process without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from contextlib import contextmanager

import torch


@contextmanager
def capturing(execute: bool = False):
    """Every `kernel[grid](...)` launch is recorded; run as well when `execute`."""
    from triton.runtime.jit import KernelInterface

    launches, launch = [], KernelInterface.__getitem__

    def record(kernel, grid):
        def go(*a, **kw):
            launches.append((kernel, grid, a, kw))
            if execute:
                launch(kernel, grid)(*a, **kw)
        return go

    KernelInterface.__getitem__ = record
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = launch


def capture(fn, *args, **kw) -> list:
    """Run `fn` (a kernel entry point) with its kernel launches recorded, not executed:
    [(kernel, grid, args, meta)]. Meta tensors keep shapes and strides at no cost."""
    with capturing() as launches:
        fn(*args, **kw)
    return launches


def trace_launches(fn, *args, **kw) -> list:
    """Run `fn` on real tensors and return its kernel launches as capture does, each replayable
    alone: `kernel[grid](*args, **meta)` (the benchmark times a block's launches this way)."""
    with capturing(execute=True) as launches:
        fn(*args, **kw)
    return launches


def signature(kernel, args, meta):
    """The specialisation Triton's JIT would make: tensors are 16-byte aligned pointers; ints
    divisible by 16 carry that fact; constexpr parameters (however passed), ints equal to 1 and
    None become constants."""
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    sig, consts, attrs = {}, {}, {}
    values = dict(zip(names, args), **{k: v for k, v in meta.items() if k in names})
    for i, name in enumerate(names):
        if name not in values:  # a constexpr left at its default
            meta = {**meta, name: kernel.params[i].default}
            values[name] = meta[name]
        v = values[name]
        if kernel.params[i].is_constexpr or name in meta or v is None or (
                isinstance(v, int) and not isinstance(v, bool) and v == 1):
            sig[name], consts[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                               torch.int64: "i64"}[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32" if abs(v) < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(kernel, sig, consts, attrs)


def _loop_lines(ttgir: str) -> list[str]:
    """The TTGIR lines inside scf.for bodies (the GEMM's K loop)."""
    out, depth = [], 0
    for line in ttgir.splitlines():
        if depth == 0 and "scf.for" in line:
            depth = line.count("{") - line.count("}")
            continue
        if depth > 0:
            depth += line.count("{") - line.count("}")
            out.append(line)
    return out


def _dot_loop_depth(ttgir: str) -> int:
    """How many scf.for loops enclose the first MMA: 1 when the K loop is the only loop (or the
    loops have been flattened into one), more when the K loop restarts inside tile loops."""
    stack = []
    for line in ttgir.splitlines():
        if "warp_group_dot " in line or "tt.dot " in line:
            return sum(stack)
        opens = line.count("{") - line.count("}")
        if opens > 0:
            stack.extend([1 if "scf.for" in line else 0] + [0] * (opens - 1))
        for _ in range(-opens):
            if stack:
                stack.pop()
    return 0


def _sass_loop(cubin: bytes, tool_dir: str) -> dict:
    """The main loop in the machine code (nvdisasm): the longest block that ends in a backward
    branch and issues tensor-core MMAs. Its instruction count per iteration against its MMAs says
    whether a K step is bound by issuing address arithmetic rather than by the tensor cores.
    Only conditional branches close a loop: a TMA wait's retry block ends in an unconditional
    jump back into the loop, which is not a loop of its own."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([os.path.join(tool_dir, "nvdisasm"), "-c", path], capture_output=True, text=True).stdout
    labels, ins = {}, []
    for line in sass.splitlines():
        lab = re.match(r"\s*\.(L_x_\d+):", line)
        if lab:
            labels[lab.group(1)] = len(ins)
        op = re.search(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", line)
        if op:
            ins.append(op.group(1).strip())
    best = []
    for i, text in enumerate(ins):
        br = re.match(r"@!?U?P\d\s+BRA\s+(?:`\()?\.?(L_x_\d+)", text)
        if br and labels.get(br.group(1), i + 1) < i:
            body = ins[labels[br.group(1)]:i + 1]
            if any("GMMA" in x for x in body) and len(body) > len(best):
                best = body
    mma = sum("GMMA" in x for x in best)
    copies = [x for x in best if x.startswith("LDGSTS")]
    return {"loop_sass_instructions": len(best), "loop_sass_mma": mma, **_smem_traffic(best),
            # async copies that allocate in L1 (no .BYPASS: a .ca copy; l1_copies.py) among the loop's copies
            "loop_l1_copies": sum(".BYPASS" not in x for x in copies), "loop_copies": len(copies),
            # spill traffic inside the loop (local-memory loads and stores): a register cap may spill
            # where it costs little (an epilogue) or in the loop, where it would cost every step
            "loop_local_memory": sum(x.split()[0].startswith(("LDL", "STL")) for x in best if x.split())}


_ELEM_BYTES = {"BF16": 2, "F16": 2, "TF32": 4, "F32": 4, "E4M3": 1, "E5M2": 1}


def _smem_traffic(body: list[str]) -> dict:
    """Shared-memory bytes one warp's loop iteration moves, from its instructions: each async
    copy (LDGSTS) writes its width for 32 lanes; each HGMMA m x n x k reads its B operand (n x k)
    and, unless A comes from registers, its A operand (m x k) from shared memory, for the whole
    warpgroup (counted once per warpgroup: the report divides by 4 warps)."""
    write = sum(int(m.group(1)) // 8 * 32 for x in body for m in [re.match(r"LDGSTS\S*\.(\d+)\s", x + " ")] if m)
    read = 0.0
    flops = 0
    for x in body:
        m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)\.\w+\.(\w+)\s+R\d+,\s*(\S+)", x)
        if m:
            mm, nn, kk, eb = int(m.group(1)), int(m.group(2)), int(m.group(3)), _ELEM_BYTES.get(m.group(4), 2)
            a_in_smem = m.group(5).startswith("gdesc")
            read += ((mm * kk if a_in_smem else 0) + nn * kk) * eb / 4
            flops += 2 * mm * nn * kk // 4
    return {"loop_smem_write_bytes_per_warp": write, "loop_smem_read_bytes_per_warp": int(read),
            "loop_mma_flops_per_warp": flops}


def smem_cap(r: dict) -> float | None:
    """The share of the tensor cores' rate that a K loop can reach before shared memory's
    bandwidth binds it (H100: 4,096 dense 16-bit FLOP and 128 bytes of shared memory per cycle
    per SM): each K step's operand tiles are written once by the async copies and read by the
    MMAs, which re-read an operand for every 64 rows of M. None where the loop has no MMA."""
    f = r.get("loop_mma_flops_per_warp")
    if not f:
        return None
    mma_cycles = f / 4096
    smem_cycles = (r["loop_smem_write_bytes_per_warp"] + r["loop_smem_read_bytes_per_warp"]) / 128
    return round(mma_cycles / max(mma_cycles, smem_cycles), 3)


_OPTIONS = ("num_warps", "num_stages", "maxnreg")  # launch keywords that are compile options


def report(kernel, grid, args, meta, arch: int = 90) -> dict:
    """Compile for sm_<arch>a and read the TTGIR, ptxas's resource line and the SASS main loop."""
    import triton
    import triton.backends.nvidia as nv
    from triton.backends.compiler import GPUTarget

    opts = {k: meta[k] for k in _OPTIONS if meta.get(k) is not None}
    kmeta = {k: v for k, v in meta.items() if k not in _OPTIONS}
    k = triton.compile(signature(kernel, args, kmeta), target=GPUTarget("cuda", arch, 128), options=opts)
    loop = _loop_lines(k.asm["ttgir"])
    tma = [m.groups() for ln in loop if "async_tma_copy_global_to_local" in ln
           for m in [re.search(r"-> !ttg\.memdesc<(\d+)x(\d+)x(\w+),", ln)] if m]
    ptx = k.asm["ptx"]
    out = {"kernel": kernel.__name__, **{n: meta[n] for n in ("BM", "BN", "BK", *_OPTIONS) if meta.get(n) is not None},
           "grid": list(grid), "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
           "loop_async_loads": sum("async_copy_global_to_local" in ln for ln in loop), "loop_tma_loads": len(tma),
           "loop_sync_tile_loads": sum(bool(re.search(r"tt\.load .*tensor<\d+x\d+x!tt\.ptr", ln)) for ln in loop),
           "dot_loop_depth": _dot_loop_depth(k.asm["ttgir"]),
           "shared_bytes": k.metadata.shared}
    ptxas = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    out.update(registers=int(regs.group(1)) if regs else None, spill_store_bytes=int(spill.group(1)) if spill else None)
    out.update(_sass_loop(k.asm["cubin"], os.path.dirname(ptxas)))
    # the copy engine writes a TMA block into shared memory for the whole program: per warp, its share
    out["loop_smem_write_bytes_per_warp"] += sum(int(r) * int(c) * _ELEM_BYTES[t.upper()] for r, c, t in tma) // k.metadata.num_warps
    out["smem_cap"] = smem_cap(out)
    return out


def conv_block_launches(cin: int, cout: int, spatial, batch: int, stride: int = 1, dtype=torch.bfloat16,
                        variant=None) -> dict:
    """The GEMM launches of one BasicBlock conv (3^3, padding 1) as the fused block makes them:
    forward with statistics, dgrad with the ReLU/BN-reduction epilogue, dgrad adding a residual,
    plain wgrad; production's kernels, or a ConvVariant's (conv3d_variants.py)."""
    from contextlib import nullcontext

    from kernels.conv3d import conv3d_dgrad, conv3d_forward, conv3d_wgrad

    x = torch.empty(batch, cin, *spatial, dtype=dtype, device="meta").contiguous(memory_format=torch.channels_last_3d)
    w = torch.empty(cout, cin, 3, 3, 3, dtype=dtype, device="meta")
    s3, p3 = (stride,) * 3, (1,) * 3
    vin = torch.empty(cin, device="meta")
    kw = {"tiles": variant.rule} if variant is not None else {}
    with variant.active() if variant is not None else nullcontext():
        with capturing():
            y = conv3d_forward(x, w, None, s3, p3, **kw)  # its shape and layout only
        return {
            "fwd+stats": capture(conv3d_forward, x, w, None, s3, p3, stats=True, **kw)[0],
            "dgrad+relu_bn": capture(conv3d_dgrad, y, w, x.shape, s3, p3, dtype, relu_bn=(x, vin, vin, vin), **kw)[0],
            "dgrad+residual": capture(conv3d_dgrad, y, w, x.shape, s3, p3, dtype, residual=x, **kw)[0],
            "wgrad": capture(conv3d_wgrad, x, y, w.shape, s3, p3, dtype, **kw)[0],
        }


def _loss_inputs(b: int, d: int, dtype):
    I = torch.empty(b, d, dtype=dtype, device="meta")
    g = torch.empty(b, dtype=torch.int32, device="meta")
    return I, g, torch.empty(b, device="meta"), torch.empty(1, device="meta")


def loss_forward_launches(b: int, d: int, tiles: str, dtype=torch.bfloat16) -> dict:
    """The contrastive loss's forward kernel at batch b, width d, under `tiles`
    ("BM,BN,BK,BD,warps,stages[,flag[,maxnreg]]", loss_variants.py; flag 0 is production's loop)."""
    from .loss_variants import launch_forward

    I, g, _, s = _loss_inputs(b, d, dtype)
    (launch,) = capture(launch_forward, I, I, s, g, g, True, tiles)
    return {"forward": launch}


def loss_backward_launches(b: int, d: int, tiles: str = "64,64,64,512,8,2,1", dtype=torch.bfloat16) -> dict:
    """The contrastive loss's two backward passes (dI over row blocks, dT over column blocks) at
    batch b, width d, under `tiles` (default: production's FULL tile; flag 5 adds TMA)."""
    from .loss_variants import triton_backward

    I, g, lse, s = _loss_inputs(b, d, dtype)
    rows, cols = capture(triton_backward, I, I, s, g, g, lse, lse, lse, 1.0 / b, tiles=tiles)
    return {"rows (dI)": rows, "cols (dT)": cols}


def loss_panel_launches(b: int, d: int, config=None, dtype=torch.bfloat16) -> dict:
    """The panel backward's three kernels (G tile, dI GEMM, dT GEMM) for the first panel, under a
    PanelConfig (default tiles unless given)."""
    from .panel import PanelConfig, panel_backward

    I, g, lse, s = _loss_inputs(b, d, dtype)
    cfg = PanelConfig(config.grad, config.mm_tiles, config.rows, "triton") if config else PanelConfig()
    grad, di, dt = capture(panel_backward, I, I, s, g, g, lse, lse, lse, 1.0 / b, config=cfg)[:3]
    return {"G tile": grad, "dI = G T": di, "dT += G^T I": dt}
